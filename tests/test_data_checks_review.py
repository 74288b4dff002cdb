"""Data checks review: a sweep checks eval_data as each run's reconstruction_error takes it
(paired batches included) and positions against it before the first run; a position is
checked against every batch of a list up front and against each batch of a stream as it is
read; a checkpoint resumed on a stream with fewer batches than it skipped is an error; and
checkpoint_every is an int that needs a checkpoint folder."""

from __future__ import annotations

import warnings

import pytest
import torch

import l3d_lens
from l3d_lens import training
from l3d_lens.data import batches
from l3d_lens.decomposition import build_task
from l3d_lens.toy import sweep as sweep_module

from .helpers import TinyMLP, tiny_lm, tokens

torch.set_num_threads(1)


class Stream:
    """A re-iterable of batches that is no list: read as it comes, known to a checkpoint by its
    type only."""

    def __init__(self, items):
        self.items = list(items)

    def __iter__(self):
        return iter(self.items)


@pytest.fixture
def runs(monkeypatch):
    """Counts the runs sweep finishes (the real decompose runs)."""
    calls = []
    real = sweep_module.decompose

    def counting(*args, **kw):
        dec = real(*args, **kw)
        calls.append(dec)
        return dec

    monkeypatch.setattr(sweep_module, "decompose", counting)
    return calls


def mlp_pairs():
    g = torch.Generator().manual_seed(0)
    x, r = torch.rand(24, 5, dtype=torch.float64, generator=g), torch.rand(24, 5, dtype=torch.float64, generator=g)
    cfg = l3d_lens.L3DConfig(components=["fc1", "fc2"], n_subnetworks=3, rank=1, epochs=1, batch_size=6,
                             reference="paired")
    return [(x[i : i + 6], r[i : i + 6]) for i in (0, 6)], [(x[i : i + 6], r[i : i + 6]) for i in (12, 18)], cfg


def test_a_paired_sweep_takes_paired_eval_batches_as_reconstruction_error_does(runs):
    """eval_data was checked as unpaired data: (x, ref) batches, which reconstruction_error
    takes, were refused up front."""
    data, eval_pairs, cfg = mlp_pairs()
    rows = sweep_module.sweep(TinyMLP(), data, cfg, eval_data=eval_pairs)
    dec = l3d_lens.decompose(TinyMLP(), data, cfg, progress=False)
    assert len(rows) == len(runs) == 1
    assert rows[0]["error"] == pytest.approx(dec.reconstruction_error(eval_pairs))


@pytest.mark.parametrize("bad, error, message", [
    ("tensor", ValueError, r"eval_data: with reference='paired' a sweep takes eval_data as an iterable of "
                           r"\(data, reference\) batches"),
    ("unpaired", TypeError, r"eval_data: with reference='paired', an iterable must yield \(data, reference\) pairs"),
])
def test_a_paired_sweep_refuses_eval_data_reconstruction_error_refuses_before_the_first_run(runs, bad, error, message):
    """A tensor eval_data was accepted and failed only after the first full run."""
    data, eval_pairs, cfg = mlp_pairs()
    eval_data = torch.cat([x for x, _ in eval_pairs]) if bad == "tensor" else [x for x, _ in eval_pairs]
    with pytest.raises(error, match=message):
        sweep_module.sweep(TinyMLP(), data, cfg, seeds=[0, 1], eval_data=eval_data)
    assert runs == []


def test_a_sweep_checks_the_position_against_eval_data_before_the_first_run(runs):
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=2, rank=1, epochs=1, sample="sequence",
                             position=5, reference="uniform")
    with pytest.raises(ValueError, match=r"eval_data: position=5 is outside the sequences of length 4; choose one "
                                         r"of -4..3"):
        sweep_module.sweep(tiny_lm("bridge"), tokens(4, 6), cfg, seeds=[0, 1], eval_data=tokens(4, 4))
    assert runs == []


def test_a_position_is_checked_against_every_batch_of_a_list_before_training(monkeypatch):
    """Only the first batch was checked: a later shorter batch raised a bare IndexError at its
    step. The message names the shortest batch, whose range fits every batch."""
    steps = []
    real = training.step
    monkeypatch.setattr(training, "step", lambda *a, **k: (steps.append(1), real(*a, **k))[1])
    model = tiny_lm("bridge")
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=2, rank=1, epochs=1, sample="sequence",
                             position=4, reference="uniform")
    data = [tokens(4, 6), tokens(4, 5, seed=2), tokens(4, 3, seed=3)]
    with pytest.raises(ValueError, match=r"position=4 is outside the sequences of length 3 \(batch 2 of the data\); "
                                         r"choose one of -3..2 \(-1: the last token\) or 'all'"):
        l3d_lens.decompose(model, data, cfg, progress=False)
    assert steps == []
    with pytest.raises(ValueError, match=r"position=-4 is outside the sequences of length 3 \(batch 2 of the data\)"):
        l3d_lens.decompose(model, tuple(data), cfg.replace(position=-4), progress=False)
    l3d_lens.decompose(model, data, cfg.replace(position=-3), progress=False)  # in range for every batch


def test_each_batch_of_a_stream_is_checked_against_the_position_as_it_is_read():
    model = tiny_lm("bridge")
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=2, rank=1, epochs=1, sample="sequence",
                             position=4, reference="uniform")
    dec = l3d_lens.decompose(model, tokens(4, 6), cfg, progress=False)
    stream = Stream([tokens(4, 6), tokens(4, 3, seed=3)])
    with pytest.raises(ValueError, match=r"position=4 is outside the sequences of length 3 \(batch 1 of the data\)"):
        dec.coefficients(stream)
    with pytest.raises(ValueError, match=r"position=4 is outside the sequences of length 3 \(batch 1 of the data\)"):
        list(batches(dec.adapter, stream, None, 4, position=4))
    assert [x.shape[1] for x, _ in batches(dec.adapter, stream, None, 4, position=2)] == [6, 3]


def test_batches_refuses_to_skip_more_batches_than_a_stream_holds():
    """skip (a resumed checkpoint's batch) past the end of the stream yielded nothing, so the
    resumed epoch ended quietly on other data; exactly skip batches (a save at an epoch's last
    batch) still ends the epoch."""
    adapter = build_task(TinyMLP(), l3d_lens.L3DConfig(components="fc1")).adapter
    stream = Stream(torch.rand(3, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert [x.shape[0] for x, _ in batches(adapter, stream, None, 2, skip=2)] == [2]
    assert list(batches(adapter, stream, None, 2, skip=3)) == []
    with pytest.raises(ValueError, match=r"the data has only 3 batches but the checkpoint resumes after batch 4: "
                                         r"the data differs from the checkpointed run's"):
        list(batches(adapter, stream, None, 2, skip=4))


def test_a_checkpoint_resumed_on_a_shorter_stream_is_an_error(tmp_path, monkeypatch):
    x = torch.rand(24, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = l3d_lens.L3DConfig(components=["fc1", "fc2"], n_subnetworks=3, rank=1, epochs=2, batch_size=6)
    real = training.step

    def step(task, f, opt, x, paired, gen, sums, i, epoch):
        if i == 3:  # the checkpoint of step 3 resumes after batch 3 of epoch 0
            raise KeyboardInterrupt
        return real(task, f, opt, x, paired, gen, sums, i, epoch)

    monkeypatch.setattr(training, "step", step)
    with pytest.raises(KeyboardInterrupt):
        l3d_lens.decompose(TinyMLP(), Stream(x.split(6)), cfg, progress=False, checkpoint=tmp_path,
                           checkpoint_every=1)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resuming a stream warns it must repeat itself
        with pytest.raises(ValueError, match=r"the data has only 2 batches but the checkpoint resumes after batch 3"):
            l3d_lens.decompose(TinyMLP(), Stream(x[:12].split(6)), cfg, progress=False, checkpoint=tmp_path)
        resumed = l3d_lens.decompose(TinyMLP(), Stream(x.split(6)), cfg, progress=False, checkpoint=tmp_path)
    assert resumed.history[-1]["steps"] == 8


@pytest.mark.parametrize("kw, message", [
    (dict(checkpoint_every=True), r"checkpoint_every must be an int >= 0 \(0: only at epoch ends\), got True"),
    (dict(checkpoint_every=2), r"checkpoint_every=2 saves a checkpoint every 2 steps into the checkpoint folder, "
                               r"but checkpoint is None; pass checkpoint=<folder> or leave checkpoint_every at 0"),
])
def test_checkpoint_every_is_an_int_and_needs_a_checkpoint_folder(kw, message):
    x = torch.rand(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = l3d_lens.L3DConfig(components="fc1", n_subnetworks=2, rank=1, epochs=1, batch_size=6)
    with pytest.raises(ValueError, match=message):
        l3d_lens.decompose(TinyMLP(), x, cfg, progress=False, **kw)


def test_decompose_checks_each_batch_of_a_stream_against_the_position():
    """A stream's later, shorter batch stops training with the position's message (it was a bare
    IndexError from inside the step)."""
    model = tiny_lm("bridge")
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=2, rank=1, epochs=1, sample="sequence",
                             position=4, reference="uniform")
    with pytest.raises(ValueError, match=r"position=4 is outside the sequences of length 3 \(batch 1 of the data\)"):
        l3d_lens.decompose(model, Stream([tokens(4, 6), tokens(4, 3, seed=3)]), cfg, progress=False)


def test_decompose_names_a_device_this_machine_lacks_before_any_work():
    """cfg.device='cuda:7' on a machine without it: one ValueError naming the device (it was an
    AssertionError from inside torch, 'Torch not compiled with CUDA enabled', on a CPU build)."""
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a CUDA device 7")
    cfg = l3d_lens.L3DConfig(components="fc1", n_subnetworks=2, rank=1, epochs=1, device="cuda:7")
    with pytest.raises(ValueError, match=r"device='cuda:7': .*use one this machine has"):
        l3d_lens.decompose(TinyMLP(), torch.rand(8, 5, dtype=torch.float64), cfg, progress=False)


def test_a_config_device_is_kept_as_a_string_and_any_backend_is_asked():
    """A torch.device is kept as its string (the config is saved as JSON); availability is asked
    of the device type's backend module (device='xpu' on a build without it was an AssertionError
    from inside torch)."""
    from l3d_lens.io import unavailable

    cfg = l3d_lens.L3DConfig(components="fc1", device=torch.device("cpu"))
    assert cfg.device == "cpu" and l3d_lens.L3DConfig.from_dict(cfg.to_dict()) == cfg
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        assert "no xpu device is available" in unavailable(torch.device("xpu"))
        with pytest.raises(ValueError, match=r"device='xpu': no xpu device is available"):
            l3d_lens.decompose(TinyMLP(), torch.rand(8, 5, dtype=torch.float64),
                               l3d_lens.L3DConfig(components="fc1", n_subnetworks=2, rank=1, device="xpu"),
                               progress=False)
    assert unavailable(torch.device("cpu")) is None
