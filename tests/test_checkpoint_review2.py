"""Checkpoint review 2: a checkpoint of an iterable records the batching rules it counted its
position by, and one of other rules is refused (a list's position is checked against its batch
count too); a partial or callable-object divergence is saved without its memory address, so its
checkpoint resumes in another process; every file and rename of a save is flushed to the disk
before the next step relies on it; token ids of another integer dtype and device='cpu' against
None on a CPU model are the same run."""

from __future__ import annotations

import functools
import json
import os
import shutil
import types

import pytest
import torch

import l3d_lens
from l3d_lens import checkpoint as ckpt
from l3d_lens import training
from l3d_lens.data import batches

from .helpers import LM_KINDS, TinyMLP, killed_at_step, tiny_lm, tokens

torch.set_num_threads(1)

#: rows of the batches of a list whose short batches (min_batch 2) merge differently under the
#: rules before BATCHING 2 (3 batches an epoch: 2, 6, 5 rows) and now (5 batches: 2, 3, 3, 2, 3)
SHORT_SIZES = [1, 1, 3, 1, 1, 1, 2, 1, 1, 1]


def mlp_setup(**kw):
    x = torch.rand(14, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = l3d_lens.L3DConfig(**{**dict(components=["fc1", "fc2"], n_subnetworks=3, rank=1, epochs=2, batch_size=6,
                                       lr=0.05), **kw})
    return x, cfg


def chunks(x, sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [x[a:a + s] for a, s in zip(starts, sizes)]


def same(a, b) -> bool:
    return a.factors.keys() == b.factors.keys() and all(torch.equal(a.factors[k], b.factors[k]) for k in a.factors)


def interrupted(monkeypatch, model, data, cfg, folder, at):
    """A checkpoint in ``folder`` of the run stopped at its step ``at`` (saved every step)."""
    killed_at_step(monkeypatch, at)
    with pytest.raises(KeyboardInterrupt):
        l3d_lens.decompose(model, data, cfg, progress=False, checkpoint=folder, checkpoint_every=1)
    monkeypatch.undo()


def edit_state(folder, edit):
    """Apply ``edit`` to the state.json of the checkpoint latest.json names in ``folder`` (and its
    step to latest.json, which must name the same)."""
    pointer = json.loads((folder / "latest.json").read_text())
    file = folder / pointer["folder"] / "state.json"
    state = json.loads(file.read_text())
    edit(state)
    file.write_text(json.dumps(state))
    (folder / "latest.json").write_text(json.dumps({**pointer, "step": state["step"]}))


def as_earlier(state):
    """A state as an l3d_lens before the batching marker wrote it."""
    state.pop("batching", None)


# --- 1. batching rules -------------------------------------------------------------------------


def test_an_iterable_checkpoint_of_other_or_unknown_batching_rules_is_refused_or_warned(tmp_path, monkeypatch):
    """An earlier l3d_lens gathered these short batches into 3 batches an epoch, this one into 5:
    its step 7 (epoch 1 of 3-batch epochs) would resume at other rows, silently, as a mix."""
    x, cfg = mlp_setup()
    data = chunks(x, SHORT_SIZES)
    straight = l3d_lens.decompose(TinyMLP(), data, cfg, progress=False)
    interrupted(monkeypatch, TinyMLP(), data, cfg, tmp_path / "ck", 7)
    for name, edit in {"earlier": as_earlier, "other": lambda s: s.update(batching=ckpt.BATCHING + 1)}.items():
        shutil.copytree(tmp_path / "ck", tmp_path / name)
        edit_state(tmp_path / name, edit)
    # without the marker it may come from the rules before or after the gathering of short batches
    # (l3d_lens wrote none before 9042f02): it warns; where its position only fits the old rules'
    # 3-batch epochs (step 7 = epoch 2, batch 1), the position check refuses it
    shutil.copytree(tmp_path / "earlier", tmp_path / "old")
    edit_state(tmp_path / "old", lambda s: s.update(epoch=2, batch=1))
    with pytest.raises(ValueError, match=r"step 7 at batch 1 of epoch 2 is no position of this run"):
        l3d_lens.decompose(TinyMLP(), data, cfg, progress=False, checkpoint=tmp_path / "old")
    with pytest.warns(UserWarning, match=r"records no batching rules: an l3d_lens before the gathering of short "
                                         r"batches \(fewer than the 2 rows.*position \(step 7, epoch 1, batch 2\)"):
        resumed = l3d_lens.decompose(TinyMLP(), data, cfg, progress=False, checkpoint=tmp_path / "earlier")
    assert same(resumed, straight)
    with pytest.raises(ValueError, match=rf"written by another l3d_lens \(batching rules {ckpt.BATCHING + 1}, this one.s {ckpt.BATCHING}\)"):
        l3d_lens.decompose(TinyMLP(), data, cfg, progress=False, checkpoint=tmp_path / "other")
    resumed = l3d_lens.decompose(TinyMLP(), data, cfg, progress=False, checkpoint=tmp_path / "ck")
    assert same(resumed, straight) and resumed.history == straight.history


def test_a_token_stream_of_short_batches_from_an_earlier_l3d_lens_warns(tmp_path, monkeypatch):
    """A TokenStream of 1-row batches (sample='sequence' against a random reference needs 2) is
    batched by the rules; one of 2-row batches is not: its earlier checkpoint resumes exactly."""
    from l3d_lens.streaming import TokenStream

    source = tmp_path / "a.txt"
    source.write_text("".join(f"line {i:03d} {'x' * (i % 5)}\n" for i in range(8)))
    model = tiny_lm(LM_KINDS[0])
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn"], n_subnetworks=3, rank=1, epochs=2, sample="sequence")

    def stream(batch_size):
        return TokenStream(source, lambda t: [ord(c) % 19 + 1 for c in t], seq_len=5, batch_size=batch_size)

    for batch_size in (1, 2):
        folder = tmp_path / f"ck{batch_size}"
        n_batches = len(list(stream(batch_size)))
        assert n_batches >= 4
        interrupted(monkeypatch, model, stream(batch_size), cfg, folder, n_batches // 2 + 1)
        edit_state(folder, as_earlier)
        if batch_size == 1:
            with pytest.warns(UserWarning, match=r"records no batching rules"):
                l3d_lens.decompose(model, stream(batch_size), cfg, progress=False, checkpoint=folder)
        else:
            resumed = l3d_lens.decompose(model, stream(batch_size), cfg, progress=False, checkpoint=folder)
            assert same(resumed, l3d_lens.decompose(model, stream(batch_size), cfg, progress=False))


@pytest.mark.parametrize("kind", ["tensor", "full batches"])
def test_an_earlier_checkpoint_resumes_where_the_batching_rules_agree(tmp_path, monkeypatch, kind):
    """A tensor is cut as before, and batches of which only the last is short merge alike under
    both rules: a checkpoint without the marker resumes to the uninterrupted result."""
    x, cfg = mlp_setup()
    data = x if kind == "tensor" else chunks(x, [4, 3, 3, 3, 1])
    interrupted(monkeypatch, TinyMLP(), data, cfg, tmp_path, 5)
    edit_state(tmp_path, as_earlier)
    resumed = l3d_lens.decompose(TinyMLP(), data, cfg, progress=False, checkpoint=tmp_path)
    assert same(resumed, l3d_lens.decompose(TinyMLP(), data, cfg, progress=False))


def test_a_list_checkpoint_position_must_fit_its_batch_count(tmp_path, monkeypatch):
    """A list's batches are in memory: 4 batches an epoch, so step 5 is batch 1 of epoch 1, and a
    state naming another step or a batch past the epoch's end is refused, as for a tensor."""
    x, cfg = mlp_setup()
    data = chunks(x, [3, 3, 3, 5])
    interrupted(monkeypatch, TinyMLP(), data, cfg, tmp_path / "ck", 5)
    for name, edit in {"step": lambda s: s.update(step=6), "batch": lambda s: s.update(step=10, batch=6)}.items():
        folder = tmp_path / name
        shutil.copytree(tmp_path / "ck", folder)
        edit_state(folder, edit)
        with pytest.raises(ValueError, match=r"is no position of this run \(4 batches an epoch, 2 epochs\)"):
            l3d_lens.decompose(TinyMLP(), data, cfg, progress=False, checkpoint=folder)
    resumed = l3d_lens.decompose(TinyMLP(), data, cfg, progress=False, checkpoint=tmp_path / "ck")
    assert same(resumed, l3d_lens.decompose(TinyMLP(), data, cfg, progress=False))


def test_the_batch_count_of_a_list_is_that_of_the_batches_it_makes():
    adapter = types.SimpleNamespace(is_language_model=False)
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        sizes = torch.randint(1, 5, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        data = [torch.zeros(s, 2) for s in sizes]
        pairs = [(b, b) for b in data]
        for min_batch in (1, 2, 3):
            try:
                made = len(list(batches(adapter, data, None, 0, None, min_batch)))
            except ValueError:  # too few rows for a batch
                made = None
            assert training.n_merged(data, 0, min_batch) == made, (sizes, min_batch)
            assert training.n_merged(pairs, 0, min_batch) == made, (sizes, min_batch)


# --- 2. a custom divergence ----------------------------------------------------------------------


def scaled_mse_factory():
    """A new function object on each call, of one qualified name: what another process has."""
    def scaled_mse(out, ref, scale):
        return scale * 0.5 * ((out - ref) ** 2).sum(-1)

    return scaled_mse


class Div:
    def __call__(self, out, ref):
        return 0.5 * ((out - ref) ** 2).sum(-1)


DIVERGENCES = {"partial": lambda: functools.partial(scaled_mse_factory(), scale=2.0), "object": Div}


@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_a_partial_or_callable_object_divergence_resumes_in_another_process(tmp_path, monkeypatch, kind):
    """Its repr held a memory address, so the config saved in a checkpoint never equalled one of
    another process: resuming there was refused as another run. A checkpoint an earlier
    l3d_lens wrote with the address resumes too."""
    x, cfg = mlp_setup(divergence=DIVERGENCES[kind]())
    saved = cfg.to_dict()["divergence"]
    assert " at 0x" not in saved and saved == cfg.replace(divergence=DIVERGENCES[kind]()).to_dict()["divergence"]
    if kind == "partial":
        assert saved == "callable:functools.partial(<function scaled_mse_factory.<locals>.scaled_mse>, scale=2.0)"
    else:  # the default repr shows no settings: a digest of them follows
        assert saved.startswith(f"callable:<{__name__}.Div object> settings ")
    interrupted(monkeypatch, TinyMLP(), x, cfg, tmp_path / "ck", 3)
    shutil.copytree(tmp_path / "ck", tmp_path / "earlier")
    old_form = "callable:" + repr(DIVERGENCES[kind]())
    assert " at 0x" in old_form
    edit_state(tmp_path / "earlier", lambda s: s["identity"]["config"].update(divergence=old_form))
    straight = l3d_lens.decompose(TinyMLP(), x, cfg, progress=False)
    # an object saved with its address (never resumable) recorded no settings: it stays refused
    for folder in ("ck", "earlier") if kind == "partial" else ("ck",):
        again = cfg.replace(divergence=DIVERGENCES[kind]())  # as another process builds it
        resumed = l3d_lens.decompose(TinyMLP(), x, again, progress=False, checkpoint=tmp_path / folder)
        assert same(resumed, straight), folder


def test_a_decomposition_with_a_partial_divergence_saves_without_an_address_and_loads(tmp_path):
    x, cfg = mlp_setup(epochs=1, divergence=DIVERGENCES["partial"]())
    dec = l3d_lens.decompose(TinyMLP(), x, cfg, progress=False)
    dec.save(tmp_path)
    assert " at 0x" not in (tmp_path / "decomposition.json").read_text()
    loaded = l3d_lens.Decomposition.load(tmp_path, TinyMLP(), divergence=DIVERGENCES["partial"]())
    assert same(loaded, dec)
    with pytest.raises(ValueError, match=r"custom divergence \(functools.partial\(<function "
                                         r"scaled_mse_factory.<locals>.scaled_mse>, scale=2.0\)\); pass it again"):
        l3d_lens.Decomposition.load(tmp_path, TinyMLP())


# --- 3. durable saves ---------------------------------------------------------------------------


def record_disk_calls(monkeypatch):
    """Log of ("fsync", path), ("replace", source, target) and ("rmtree", path), in call order."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names an fsync'd file by /proc/self/fd")
    log = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b, **kw):
        log.append(("replace", os.path.realpath(a), os.path.realpath(b)))
        return real_replace(a, b, **kw)

    def rmtree(path, *args, **kw):
        log.append(("rmtree", os.path.realpath(path)))
        return real_rmtree(path, *args, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return log


def test_a_checkpoint_save_flushes_each_file_and_rename_before_relying_on_it(tmp_path, monkeypatch):
    """Files before the rename that publishes them, the folder's renames before the pointer names
    the new folder, the pointer before the older folder goes: a power loss leaves one checkpoint."""
    tmp_path = tmp_path.resolve()
    ckpt.save(tmp_path, {"step": 1}, {"a": torch.zeros(3)})
    log = record_disk_calls(monkeypatch)
    ckpt.save(tmp_path, {"step": 2}, {"a": torch.ones(3)})
    monkeypatch.undo()

    def at(*entry):
        assert entry in log, (entry, log)
        return log.index(entry)

    folder, pointer = str(tmp_path), str(tmp_path / ".latest.json.tmp")
    move = next(i for i, e in enumerate(log) if e[0] == "replace" and e[2] == str(tmp_path / "step-2"))
    tmp = log[move][1]
    for file in (f"{tmp}/tensors.safetensors", f"{tmp}/state.json", tmp):
        assert at("fsync", file) < move
    publish = at("replace", pointer, str(tmp_path / "latest.json"))
    assert move < log.index(("fsync", folder), move) < at("fsync", pointer) < publish
    remove = at("rmtree", str(tmp_path / "step-1"))
    assert publish < log.index(("fsync", folder), publish) < remove
    assert json.loads((tmp_path / "latest.json").read_text()) == {"folder": "step-2", "step": 2}
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "step-2"]


def test_a_decomposition_save_flushes_its_files_before_replacing_the_old(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    x, cfg = mlp_setup(epochs=1)
    dec = l3d_lens.decompose(TinyMLP(), x, cfg, progress=False)
    log = record_disk_calls(monkeypatch)
    dec.save(tmp_path)
    monkeypatch.undo()
    moves = [e for e in log if e[0] == "replace"]
    assert [os.path.basename(e[2]) for e in moves] == ["decomposition.json", "factors.safetensors"]
    first = log.index(moves[0])
    for _, tmp, _ in moves:
        assert log.index(("fsync", tmp)) < first
    assert ("fsync", str(tmp_path)) in log[log.index(moves[1]):]
    assert same(l3d_lens.Decomposition.load(tmp_path, TinyMLP()), dec)


# --- 4. the same run, given otherwise --------------------------------------------------------------


def test_token_ids_of_another_integer_dtype_are_the_same_data(tmp_path, monkeypatch):
    """Training reads token ids as int64 whatever their integer dtype: x.int() is x."""
    x = tokens(n=8)
    fingerprint = training.data_fingerprint(x)
    for other in (x.int(), x.to(torch.uint8), x.t().contiguous().t()):
        assert training.data_fingerprint(other) == fingerprint
    assert training.data_fingerprint([x[:4].int(), x[4:]]) == training.data_fingerprint([x[:4], x[4:]])
    monkeypatch.setattr(training, "PART", 5)  # converted a few ids at a time: the same fingerprint
    assert training.data_fingerprint(x.int()) == fingerprint
    assert training.data_fingerprint(x.flip(0).int()) != fingerprint
    monkeypatch.undo()
    model = tiny_lm(LM_KINDS[0])
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn"], n_subnetworks=3, rank=1, epochs=2, batch_size=4,
                             sample="sequence")
    interrupted(monkeypatch, model, x, cfg, tmp_path, 3)
    resumed = l3d_lens.decompose(model, x.int(), cfg, progress=False, checkpoint=tmp_path)
    assert same(resumed, l3d_lens.decompose(model, x, cfg, progress=False))


@pytest.mark.parametrize("saved, now", [(None, "cpu"), ("cpu", None)])
def test_device_cpu_and_none_on_a_cpu_model_are_the_same_run(tmp_path, monkeypatch, saved, now):
    x, cfg = mlp_setup()
    interrupted(monkeypatch, TinyMLP(), x, cfg.replace(device=saved), tmp_path, 3)
    resumed = l3d_lens.decompose(TinyMLP(), x, cfg.replace(device=now), progress=False, checkpoint=tmp_path)
    assert same(resumed, l3d_lens.decompose(TinyMLP(), x, cfg, progress=False))
    edit_state(tmp_path, lambda s: s["identity"]["config"].update(device="cuda:0"))  # another device stays another
    with pytest.raises(ValueError, match=r"belongs to another run: config \(device: 'cuda:0' in the checkpoint, "
                                         r"'cpu' now\)"):
        l3d_lens.decompose(TinyMLP(), x, cfg.replace(device=now), progress=False, checkpoint=tmp_path)


def test_a_device_given_as_none_both_times_is_the_same_whatever_the_models_device():
    from l3d_lens.training import comparable

    saved, now = comparable({"device": None}, {"device": None}, torch.device("cuda", 1))
    assert saved["device"] is None and now["device"] is None
    saved, now = comparable({"device": None}, {"device": "cpu"}, torch.device("cpu"))
    assert saved["device"] == now["device"] == "cpu"
    saved, now = comparable({"device": "cuda:0"}, {"device": None}, torch.device("cpu"))
    assert saved["device"] == "cuda:0" and now["device"] == "cpu"


class _Scaled:
    def __init__(self, scale):
        self.scale = scale

    def __call__(self, out, ref):
        return self.scale * ((out - ref) ** 2).sum(-1)


def test_callable_objects_of_other_settings_are_other_runs():
    """The default repr shows no settings: a digest of the attributes tells ScaledMSE(1) from
    ScaledMSE(1000), the same in every process (no address in it)."""
    def cfg(div):
        return l3d_lens.L3DConfig(components=["0.weight"], n_subnetworks=2, rank=1, divergence=div).to_dict()

    one, other, again = (cfg(_Scaled(s))["divergence"] for s in (1, 1000, 1))
    assert one == again and one != other and "0x" not in one
    assert one.startswith("callable:<") and " settings " in one
