"""Checkpoint review: a checkpoint names the model and the paired reference it was made for; a
save of a step already saved never removes the checkpoint latest.json names before it is
replaced; loading copes with leftovers of a killed save; resuming a stream mid-run warns that
it is bit-identical only if the stream repeats itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

import l3d_lens
from l3d_lens import checkpoint as ckpt
from l3d_lens import training

from .helpers import TinyMLP, killed_at_step, tiny_lm, tokens

torch.set_num_threads(1)


def mlp_setup(**kw):
    x = torch.rand(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = l3d_lens.L3DConfig(**{**dict(components=["fc1", "fc2"], n_subnetworks=3, rank=1, epochs=2, batch_size=6,
                                       lr=0.05), **kw})
    return x, cfg


def same(a, b) -> bool:
    return a.factors.keys() == b.factors.keys() and all(torch.equal(a.factors[k], b.factors[k]) for k in a.factors)


class Killer:
    """Stands in for the ``os`` or ``shutil`` module inside l3d_lens.checkpoint, counting the
    calls of the functions named in ``ops`` and raising KeyboardInterrupt (a kill) at call
    ``kill_at`` (1-based; 0: never)."""

    def __init__(self, real, ops, log, kill_at):
        self._real = real
        for name in ops:
            setattr(self, name, self._wrap(name, getattr(real, name), log, kill_at))

    @staticmethod
    def _wrap(name, fn, log, kill_at):
        def wrapped(*args, **kwargs):
            log.append((name, [os.path.basename(str(a)) for a in args]))
            if len(log) == kill_at:
                raise KeyboardInterrupt(f"killed at {name}{tuple(log[-1][1])}")
            return fn(*args, **kwargs)

        return wrapped

    def __getattr__(self, name):
        return getattr(self._real, name)


# --- 1. the model ----------------------------------------------------------------------------


def test_checkpoint_of_another_model_is_refused(tmp_path):
    x, cfg = mlp_setup()
    first = l3d_lens.decompose(TinyMLP(seed=0), x, cfg, progress=False, checkpoint=tmp_path)
    with pytest.raises(ValueError, match=r"belongs to another run: model weights.*fresh checkpoint folder"):
        l3d_lens.decompose(TinyMLP(seed=1), x, cfg, progress=False, checkpoint=tmp_path)
    # the same weights in another object are the same model: the finished run comes back
    again = l3d_lens.decompose(TinyMLP(seed=0), x, cfg, progress=False, checkpoint=tmp_path)
    assert same(again, first)


def test_checkpoint_of_a_model_differing_outside_the_decomposed_weights_is_refused(tmp_path):
    """Only fc1 is decomposed, but fc2 shapes every gradient: another fc2 is another run."""
    x, cfg = mlp_setup(components=["fc1"])
    l3d_lens.decompose(TinyMLP(seed=0), x, cfg, progress=False, checkpoint=tmp_path)
    other = TinyMLP(seed=0)
    with torch.no_grad():
        other.fc2.weight.mul_(2)
    with pytest.raises(ValueError, match=r"belongs to another run: model weights \(outside the decomposed"):
        l3d_lens.decompose(other, x, cfg, progress=False, checkpoint=tmp_path)


def test_checkpoint_of_another_language_model_is_refused(tmp_path, lm_kind):
    """The same language model built again resumes (its fingerprint is stable across builds and
    calls); another one is refused."""
    data = tokens(8, 5)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn"], n_subnetworks=3, rank=1, epochs=1, batch_size=8,
                             sample="sequence")
    model = tiny_lm(lm_kind, seed=0)
    first = l3d_lens.decompose(model, data, cfg, progress=False, checkpoint=tmp_path)
    assert same(l3d_lens.decompose(model, data, cfg, progress=False, checkpoint=tmp_path), first)
    assert same(l3d_lens.decompose(tiny_lm(lm_kind, seed=0), data, cfg, progress=False, checkpoint=tmp_path), first)
    with pytest.raises(ValueError, match=r"belongs to another run: model weights \(the decomposed"):
        l3d_lens.decompose(tiny_lm(lm_kind, seed=1), data, cfg, progress=False, checkpoint=tmp_path)


def test_the_refusal_names_what_differs(tmp_path):
    x, cfg = mlp_setup()
    l3d_lens.decompose(TinyMLP(), x, cfg, progress=False, checkpoint=tmp_path)
    with pytest.raises(ValueError, match=r"belongs to another run: config \(seed: 0 in the checkpoint, 3 now\)"):
        l3d_lens.decompose(TinyMLP(), x, cfg.replace(seed=3), progress=False, checkpoint=tmp_path)
    with pytest.raises(ValueError, match=r"belongs to another run: data differ"):
        l3d_lens.decompose(TinyMLP(), x.flip(0), cfg, progress=False, checkpoint=tmp_path)


# --- 2. the paired reference ------------------------------------------------------------------


def test_checkpoint_with_another_paired_reference_is_refused(tmp_path):
    x, cfg = mlp_setup(reference="paired")
    ref_a = torch.rand(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_b = torch.rand(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    first = l3d_lens.decompose(TinyMLP(), x, cfg, reference=ref_a, progress=False, checkpoint=tmp_path)
    with pytest.raises(ValueError, match=r"belongs to another run: reference data.*fresh checkpoint folder"):
        l3d_lens.decompose(TinyMLP(), x, cfg, reference=ref_b, progress=False, checkpoint=tmp_path)
    again = l3d_lens.decompose(TinyMLP(), x, cfg, reference=ref_a.clone(), progress=False, checkpoint=tmp_path)
    assert same(again, first)


def test_a_checkpoint_from_before_model_and_reference_were_recorded_resumes_with_a_warning(tmp_path):
    x, cfg = mlp_setup()
    l3d_lens.decompose(TinyMLP(), x, cfg.replace(epochs=1), progress=False, checkpoint=tmp_path)
    folder = tmp_path / json.loads((tmp_path / "latest.json").read_text())["folder"]
    state = json.loads((folder / "state.json").read_text())
    for part in ("model", "reference"):
        del state["identity"][part]
    state["identity"]["config"]["epochs"] = 2
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="does not record the model it was made with"):
        resumed = l3d_lens.decompose(TinyMLP(), x, cfg, progress=False, checkpoint=tmp_path)
    assert same(resumed, l3d_lens.decompose(TinyMLP(), x, cfg, progress=False))


# --- 3. atomic saving --------------------------------------------------------------------------


def test_a_kill_at_any_step_of_any_save_leaves_a_resumable_checkpoint(tmp_path, monkeypatch):
    """checkpoint_every=1 saves every step, so each epoch end saves the step its last batch saved
    again; the checkpoint module's os.replace and shutil.rmtree are each, in turn, where the run
    is killed. Every rerun of the same call must give the uninterrupted result (the old save
    removed step-<n> before moving the new step-<n> in: a kill there left latest.json naming a
    missing folder and every rerun failed with FileNotFoundError)."""
    x, cfg = mlp_setup()
    straight = l3d_lens.decompose(TinyMLP(), x, cfg, progress=False)

    def run(folder, kill_at):
        log = []
        monkeypatch.setattr(ckpt, "os", Killer(os, ["replace"], log, kill_at))
        monkeypatch.setattr(ckpt, "shutil", Killer(shutil, ["rmtree"], log, kill_at))
        try:
            l3d_lens.decompose(TinyMLP(), x, cfg, progress=False, checkpoint=folder, checkpoint_every=1)
        finally:
            monkeypatch.undo()
        return log

    n_ops = len(run(tmp_path / "count", 0))
    assert n_ops > 10
    for k in range(1, n_ops + 1):
        folder = tmp_path / f"kill-{k}"
        with pytest.raises(KeyboardInterrupt):
            run(folder, k)
        resumed = l3d_lens.decompose(TinyMLP(), x, cfg, progress=False, checkpoint=folder, checkpoint_every=1)
        assert same(resumed, straight), f"killed at operation {k}"
        assert resumed.history == straight.history
        # a kill while removing older folders (after latest.json moved on) may leave one; the next save removes it
        assert json.loads((folder / "latest.json").read_text())["step"] == 4
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp")], k


def test_loading_recovers_the_checkpoint_a_killed_old_save_left_in_its_tmp_folder(tmp_path):
    """The state an earlier l3d_lens left when killed between removing step-<n> and moving the
    new step-<n> in: latest.json names a missing folder; the complete save is in .tmp-step-<n>-<pid>."""
    x, cfg = mlp_setup()
    l3d_lens.decompose(TinyMLP(), x, cfg.replace(epochs=1), progress=False, checkpoint=tmp_path)
    pointer = json.loads((tmp_path / "latest.json").read_text())
    os.rename(tmp_path / pointer["folder"], tmp_path / f".tmp-step-{pointer['step']}-99999")
    (tmp_path / f".tmp-step-{pointer['step']}-88888").mkdir()  # an incomplete one, killed while writing
    loaded = ckpt.load(tmp_path)
    assert loaded is not None and loaded[0]["step"] == pointer["step"]
    resumed = l3d_lens.decompose(TinyMLP(), x, cfg.replace(epochs=1), progress=False, checkpoint=tmp_path)
    assert same(resumed, l3d_lens.decompose(TinyMLP(), x, cfg.replace(epochs=1), progress=False))


def test_a_leftover_tmp_folder_is_ignored_and_removed_by_the_next_save(tmp_path, monkeypatch):
    x, cfg = mlp_setup()
    killed_at_step(monkeypatch, 3)  # mid epoch 1
    with pytest.raises(KeyboardInterrupt):
        l3d_lens.decompose(TinyMLP(), x, cfg, progress=False, checkpoint=tmp_path, checkpoint_every=1)
    monkeypatch.undo()
    leftover = tmp_path / ".tmp-step-7-12345"  # a save killed while writing its tensors
    leftover.mkdir()
    (leftover / "tensors.safetensors").write_bytes(b"\x00" * 10)
    resumed = l3d_lens.decompose(TinyMLP(), x, cfg, progress=False, checkpoint=tmp_path)
    assert same(resumed, l3d_lens.decompose(TinyMLP(), x, cfg, progress=False))
    assert not leftover.exists()


def test_a_pointer_to_a_missing_folder_is_named(tmp_path):
    x, cfg = mlp_setup()
    l3d_lens.decompose(TinyMLP(), x, cfg.replace(epochs=1), progress=False, checkpoint=tmp_path)
    shutil.rmtree(tmp_path / json.loads((tmp_path / "latest.json").read_text())["folder"])
    with pytest.raises(FileNotFoundError, match=r"latest.json names step-2, which is missing.*fresh checkpoint"):
        l3d_lens.decompose(TinyMLP(), x, cfg, progress=False, checkpoint=tmp_path)


# --- 4. streams --------------------------------------------------------------------------------


def stream_warnings(record):
    return [w for w in record if "same batches in the same order" in str(w.message)]


def test_resuming_a_stream_warns_it_must_repeat_itself(tmp_path, monkeypatch):
    x, cfg = mlp_setup(epochs=2, batch_size=3)

    def loader():
        return DataLoader(x, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))

    killed_at_step(monkeypatch, 5)  # mid epoch 1 (4 batches an epoch)
    with pytest.raises(KeyboardInterrupt):
        l3d_lens.decompose(TinyMLP(), loader(), cfg, progress=False, checkpoint=tmp_path, checkpoint_every=1)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"resumes at step 5 \(epoch 1, batch 1\) on a DataLoader.*same batches in the "
                                         r"same order on every pass.*shuffle=True"):
        l3d_lens.decompose(TinyMLP(), loader(), cfg, progress=False, checkpoint=tmp_path, checkpoint_every=1)
    with warnings.catch_warnings(record=True) as record:  # finished: nothing left to read, nothing to warn of
        warnings.simplefilter("always")
        l3d_lens.decompose(TinyMLP(), loader(), cfg, progress=False, checkpoint=tmp_path, checkpoint_every=1)
    assert not stream_warnings(record)


def test_resuming_a_list_of_batches_does_not_warn(tmp_path, monkeypatch):
    x, cfg = mlp_setup(epochs=2, batch_size=3)
    data = [x[i : i + 3] for i in range(0, 12, 3)]
    killed_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        l3d_lens.decompose(TinyMLP(), data, cfg, progress=False, checkpoint=tmp_path, checkpoint_every=1)
    monkeypatch.undo()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        resumed = l3d_lens.decompose(TinyMLP(), data, cfg, progress=False, checkpoint=tmp_path, checkpoint_every=1)
    assert not stream_warnings(record)
    assert same(resumed, l3d_lens.decompose(TinyMLP(), data, cfg, progress=False))


#: the text of the one-file source the TokenStream tests stream
STREAM_TEXT = "".join(f"line {i:03d} {'x' * (i % 5)}\n" for i in range(12))


def _encode(text):
    return [ord(c) % 19 + 1 for c in text]


def _stream(source, tokenize=_encode, seq_len=5, batch_size=4):
    from l3d_lens.streaming import TokenStream

    return TokenStream(source, tokenize, seq_len=seq_len, batch_size=batch_size)


def _interrupted_stream_run(tmp_path, monkeypatch):
    """(model, source, cfg, straight): ``STREAM_TEXT`` in tmp_path / "src" / "a.txt", a run on its
    stream, and a checkpoint of the same run stopped mid epoch 1 in tmp_path / "ck"."""
    source = tmp_path / "src" / "a.txt"
    source.parent.mkdir()
    source.write_text(STREAM_TEXT)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn"], n_subnetworks=3, rank=1, epochs=2, batch_size=4,
                             sample="sequence")
    model = tiny_lm("bridge")
    straight = l3d_lens.decompose(model, _stream(source), cfg, progress=False)
    killed_at_step(monkeypatch, len(list(_stream(source))) + 1)  # mid epoch 1
    with pytest.raises(KeyboardInterrupt):
        l3d_lens.decompose(model, _stream(source), cfg, progress=False, checkpoint=tmp_path / "ck",
                           checkpoint_every=1)
    monkeypatch.undo()
    return model, source, cfg, straight


def test_resuming_a_token_stream_does_not_warn_and_is_bit_identical(tmp_path, monkeypatch):
    """TokenStream re-reads its source in the same order on every pass: it resumes exactly."""
    model, source, cfg, straight = _interrupted_stream_run(tmp_path, monkeypatch)
    assert len(list(_stream(source))) >= 3
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        resumed = l3d_lens.decompose(model, _stream(source), cfg, progress=False, checkpoint=tmp_path / "ck")
    assert not stream_warnings(record)
    assert same(resumed, straight) and resumed.history == straight.history


def test_the_model_fingerprint_leaves_the_decomposed_weights_to_their_own_hash():
    """It compared ids of detached views, so no decomposed weight was ever left out of the
    "others" hash: every parameter was hashed, the decomposed ones twice."""
    from l3d_lens.decomposition import build_task

    model = TinyMLP()
    task = build_task(model, l3d_lens.L3DConfig(components="fc1"))
    before = training.model_fingerprint(task)
    with torch.no_grad():
        model.fc1.weight[0, 0] += 1.0
    moved = training.model_fingerprint(task)
    assert moved["weights"] != before["weights"] and moved["others"] == before["others"]
    with torch.no_grad():
        model.fc2.bias[0] += 1.0
    assert training.model_fingerprint(task)["others"] != moved["others"]


def test_a_save_never_reuses_the_folder_of_a_recovered_leftover(tmp_path, monkeypatch):
    """A leftover .tmp-step-<n>-<pid> that load() recovers was removed by the next save of step n
    from a process with the same id (common in containers) before that save was in place."""
    x, cfg = mlp_setup()
    l3d_lens.decompose(TinyMLP(), x, cfg.replace(epochs=1), progress=False, checkpoint=tmp_path)
    pointer = json.loads((tmp_path / "latest.json").read_text())
    recovered = tmp_path / f".tmp-step-{pointer['step']}-4242"
    os.rename(tmp_path / pointer["folder"], recovered)
    state, tensors = ckpt.load(tmp_path)
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    monkeypatch.setattr(ckpt, "write_safetensors", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, state, tensors)
    assert ckpt.load(tmp_path)[0]["step"] == pointer["step"]


# --- 5. damaged checkpoints, the checkpoint path, folders that are not a save's -----------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch checkpoint (saved every 2 steps) and the result it resumes to."""
    folder = tmp_path_factory.mktemp("finished")
    x, cfg = mlp_setup()
    return folder, l3d_lens.decompose(TinyMLP(), x, cfg, progress=False, checkpoint=folder, checkpoint_every=2)


def _state(s, key, value):
    s[key] = value


def _factor(t, value):
    k = "factor/in/fc1.weight/U0"  # [3, 4, 1]
    t[k] = value(t[k].clone())


def _nan(t):
    t.view(-1)[0] = float("nan")
    return t


DAMAGE = {
    "pointer not JSON": ("latest.json", lambda d: (d / "latest.json").write_text("{oops"), r"not valid JSON"),
    "pointer a list": ("latest.json", lambda d: (d / "latest.json").write_text("[]"), r"holds a JSON list"),
    "pointer without folder": ("latest.json", lambda d: (d / "latest.json").write_text('{"step": 4}'),
                               r"must hold \{\"folder\""),
    "pointer outside": ("latest.json", lambda d: (d / "latest.json").write_text('{"folder": "../x", "step": 4}'),
                        r"must hold \{\"folder\""),
    "pointer a folder": ("latest.json", lambda d: ((d / "latest.json").unlink(), (d / "latest.json").mkdir()),
                         r"is not a file"),
    "state not JSON": ("state.json", lambda s: None, r"not valid JSON"),
    "no optimizer": ("state.json", lambda s: s.pop("optimizer"), r"lacks \['optimizer'\]"),
    "no identity": ("state.json", lambda s: s.pop("identity"), r"lacks \['identity'\]"),
    "identity world": ("state.json", lambda s: s["identity"].pop("world"), r"'identity' must hold config"),
    "step a string": ("state.json", lambda s: _state(s, "step", "4"), r"'step' must be an int, got '4'"),
    "step differs": ("state.json", lambda s: _state(s, "step", 3), r"holds step 3; latest.json names it step 4"),
    "epoch -5": ("state.json", lambda s: _state(s, "epoch", -5), r"'epoch' is -5; this run's epochs are 0 to 2"),
    "epoch 1 of step 4": ("state.json", lambda s: _state(s, "epoch", 1),
                          r"step 4 at batch 0 of epoch 1 is no position"),
    "batch": ("state.json", lambda s: _state(s, "batch", 1), r"step 4 at batch 1 of epoch 2"),
    "history": ("state.json", lambda s: s["history"].pop(), r"'history' must hold the records of epochs 0 to 1"),
    "loss_den": ("state.json", lambda s: _state(s, "loss_den", -1.0), r"running sums"),
    "adam keys": ("state.json", lambda s: s["optimizer"]["state_keys"].update({"99": ["step"]}), r"'optimizer' is not"),
    "adam betas": ("state.json", lambda s: s["optimizer"]["param_groups"][0].update(betas=[0.5, 0.5]),
                   r"'optimizer' is not"),
    "scheduler": ("state.json", lambda s: s["scheduler"].update(last_epoch=7), r"'scheduler' is not"),
    "factor missing": ("tensors", lambda t: t.pop("factor/in/fc1.weight/U0"), r"lacks 'factor/in/fc1.weight/U0'"),
    "rng missing": ("tensors", lambda t: t.pop("rng"), r"lacks 'rng'"),
    "factor broadcastable": ("tensors", lambda t: _factor(t, lambda v: v[:1].clone()),
                             r"'factor/in/fc1.weight/U0' has shape \(1, 4, 1\); this run's is \(3, 4, 1\)"),
    "factor 7x7": ("tensors", lambda t: _factor(t, lambda v: torch.zeros(7, 7, dtype=v.dtype)), r"has shape \(7, 7\)"),
    "factor float64": ("tensors", lambda t: _factor(t, lambda v: v.double()),
                       r"has dtype torch.float64; this run's is torch.float32"),
    "factor NaN": ("tensors", lambda t: _factor(t, _nan), r"'factor/in/fc1.weight/U0' holds NaN or inf"),
    "extra tensor": ("tensors", lambda t: t.update(extra=torch.zeros(1)), r"unexpected tensors \['extra'\]"),
    "exp_avg_sq": ("tensors", lambda t: t.update({"adam/0/exp_avg_sq": -t["adam/0/exp_avg_sq"] - 1}), r"Adam state"),
    "order": ("tensors", lambda t: t.update(order=torch.zeros(12, dtype=torch.int64)), r"'order' is not an order"),
    "rng garbage": ("tensors", lambda t: t.update(rng=torch.zeros_like(t["rng"])), r"'rng' is not a random"),
    "tensors file garbage": ("tensors.safetensors", lambda f: f.write_bytes(b"junk"), r"not a readable safetensors"),
}


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_naming_its_file_before_anything_changes(finished, tmp_path, case, monkeypatch):
    """Each was resumed silently (a [1, 4, 1] factor broadcast into [3, 4, 1], a NaN factor came
    back, epoch -5 trained 7 more epochs) or crashed with a raw KeyError/TypeError/RuntimeError."""
    from safetensors.torch import load_file, save_file

    src, _ = finished
    folder = tmp_path / "ck"
    shutil.copytree(src, folder)
    step_folder = folder / json.loads((folder / "latest.json").read_text())["folder"]
    where, edit, message = DAMAGE[case]
    if where == "latest.json":
        edit(folder)
        file = folder / "latest.json"
    elif where == "state.json":
        file = step_folder / "state.json"
        state = json.loads(file.read_text())
        edit(state)
        file.write_text("{oops" if case == "state not JSON" else json.dumps(state))
    elif where == "tensors":
        file = step_folder / "tensors.safetensors"
        tensors = load_file(file)
        edit(tensors)
        save_file(tensors, file)
    else:
        file = step_folder / where
        edit(file)
    before = snapshot(folder)
    x, cfg = mlp_setup()
    model, data = TinyMLP(), x.clone()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(training, "step", lambda *a: pytest.fail("trained on a damaged checkpoint"))
    with pytest.raises(ValueError, match=re.escape(str(file)) + ": .*" + message + r".*cannot be resumed: remove "
                                         r"the folder .* or pass another checkpoint folder") as e:
        l3d_lens.decompose(model, data, cfg, progress=False, checkpoint=folder)
    assert str(folder) in str(e.value)
    assert snapshot(folder) == before
    assert torch.equal(data, x) and all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_the_undamaged_copy_resumes_to_the_finished_result(finished, tmp_path):
    """The cases above differ from a checkpoint that resumes only by their damage."""
    src, result = finished
    shutil.copytree(src, tmp_path / "ck")
    x, cfg = mlp_setup()
    assert same(l3d_lens.decompose(TinyMLP(), x, cfg, progress=False, checkpoint=tmp_path / "ck"), result)


def test_a_checkpoint_path_that_is_a_file_is_refused_before_training(tmp_path, monkeypatch):
    """It failed after the first epoch with a raw FileExistsError from the first save."""
    x, cfg = mlp_setup()
    afile = tmp_path / "afile.txt"
    afile.write_text("user data")
    monkeypatch.setattr(training, "step", lambda *a: pytest.fail("trained before checking the checkpoint path"))
    with pytest.raises(ValueError, match=r"checkpoint=.*afile.txt': it is a file, not a folder.*pass a folder path"):
        l3d_lens.decompose(TinyMLP(), x, cfg, progress=False, checkpoint=afile)
    with pytest.raises(ValueError, match=r"its parent .*afile.txt is a file, not a folder"):
        l3d_lens.decompose(TinyMLP(), x, cfg, progress=False, checkpoint=afile / "ck")
    with pytest.raises(TypeError, match=r"checkpoint must be a folder path \(str or os.PathLike\) or None, got int"):
        l3d_lens.decompose(TinyMLP(), x, cfg, progress=False, checkpoint=3)
    assert afile.read_text() == "user data" and sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


def test_a_save_removes_only_the_folders_saves_made(tmp_path):
    """Every save removed any step-* folder beside it, e.g. a user's step-results/."""
    mine = {"step-results/notes.txt": "results", "step-3/notes.txt": "a step-<n> name, a user's file",
            "step-5/state.json": "a save's file name, no marker", "step-log.txt": "a file",
            ".tmp-step-9-1/notes.txt": "a leftover's name, a user's file"}
    for name, text in mine.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    x, cfg = mlp_setup()
    l3d_lens.decompose(TinyMLP(), x, cfg, progress=False, checkpoint=tmp_path, checkpoint_every=1)
    assert {name: (tmp_path / name).read_text() for name in mine} == mine
    latest = json.loads((tmp_path / "latest.json").read_text())["folder"]
    saves = sorted(p.name for p in tmp_path.iterdir() if (p / ckpt.MARKER).is_file())
    assert saves == [latest]  # the older saves (steps 1 to 4, and step 4 again at the epoch end) are gone


def test_a_token_stream_checkpoint_refuses_another_stream_and_follows_moved_files(tmp_path, monkeypatch):
    """A checkpoint knows a TokenStream by its settings, files and first batch: another file,
    seq_len, batch_size, tokenizer or text is refused as other data (it resumed silently, mixing
    the two streams); the same file moved to another folder resumes, bit-identical."""
    model, source, cfg, straight = _interrupted_stream_run(tmp_path, monkeypatch)

    def write(folder, text):
        folder.mkdir(exist_ok=True)
        (folder / "a.txt").write_text(text)
        return folder / "a.txt"

    others = {"another file": _stream(write(tmp_path / "b", "sun moon day night\n" * 6)),
              "edited text": _stream(write(tmp_path / "c", STREAM_TEXT.replace("line 000", "LINE 000"))),
              "seq_len": _stream(source, seq_len=6), "batch_size": _stream(source, batch_size=3),
              "tokenizer": _stream(source, tokenize=lambda s: [ord(c) % 17 + 1 for c in s])}
    for what, other in others.items():
        with pytest.raises(ValueError, match=r"differs.*\bdata\b|\bdata\b.*differ"):
            l3d_lens.decompose(model, other, cfg, progress=False, checkpoint=tmp_path / "ck")
    moved = write(tmp_path / "moved", STREAM_TEXT)
    resumed = l3d_lens.decompose(model, _stream(moved), cfg, progress=False, checkpoint=tmp_path / "ck")
    assert same(resumed, straight) and resumed.history == straight.history


def test_a_token_stream_checkpoint_of_an_earlier_l3d_lens_resumes_with_a_warning(tmp_path, monkeypatch):
    """An earlier l3d_lens recorded a TokenStream as 'iterable:TokenStream': it cannot be checked
    against this stream, so it resumes with a warning (as other unrecorded parts), not refused as
    other data."""
    model, source, cfg, straight = _interrupted_stream_run(tmp_path, monkeypatch)
    rewritten = 0
    for file in (tmp_path / "ck").rglob("*.json"):
        meta = json.loads(file.read_text())
        if str(meta.get("identity", {}).get("data", "")).startswith("tokenstream:"):
            meta["identity"]["data"] = "iterable:TokenStream"
            file.write_text(json.dumps(meta))
            rewritten += 1
    assert rewritten
    with pytest.warns(UserWarning, match=r"does not record the data \(a TokenStream, known then by its type only\)"):
        resumed = l3d_lens.decompose(model, _stream(source), cfg, progress=False, checkpoint=tmp_path / "ck")
    assert same(resumed, straight) and resumed.history == straight.history


def test_token_stream_ids_may_be_numpy_or_a_tensor_and_must_be_ids():
    """prefix=model.to_tokens('')[0] (a tensor) or numpy ids streamed, but a checkpoint's
    fingerprint could not serialise them; they are read as ints. Other values are refused."""
    import numpy as np

    from l3d_lens.streaming import TokenStream

    source = os.path.join(os.path.dirname(__file__), "..", "README.md")

    def stream(**kw):
        return TokenStream(source, lambda s: [ord(c) % 19 + 1 for c in s[:40]], seq_len=6, batch_size=2,
                           max_batches=2, **kw)

    plain = stream(prefix=[3], separator=[1, 2])
    for kw in ({"prefix": np.array([3]), "separator": np.array([1, 2])},
               {"prefix": torch.tensor([3]), "separator": torch.tensor([1, 2])}):
        other = stream(**kw)
        assert other.fingerprint() == plain.fingerprint()
        assert all(torch.equal(a, b) for a, b in zip(other, plain))
    for bad in ("ab", [1.5], [-1], 7, [True]):
        with pytest.raises(TypeError, match=r"separator must be a sequence of token ids"):
            stream(separator=bad)


def test_a_saved_dataset_stream_is_known_by_the_files_it_reads(tmp_path):
    """A dataset folder's fingerprint covers its split's data files: a cache file that .map()
    on the loaded dataset writes there, or a change to another split, leaves it as it was (it
    refused the resume); other data in the split changes it."""
    datasets = pytest.importorskip("datasets")
    from l3d_lens.streaming import TokenStream

    def save(folder, texts):
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                              "test": datasets.Dataset.from_dict({"text": ["held out"] * 3})}).save_to_disk(str(folder))

    texts = [f"some text number {i} here" for i in range(50)]
    save(tmp_path / "ds", texts)

    def fingerprint(folder=tmp_path / "ds"):
        return TokenStream(folder, lambda s: [ord(c) % 50 for c in s], 8, 4, split="train").fingerprint()

    before = fingerprint()
    datasets.load_from_disk(str(tmp_path / "ds"))["train"].map(lambda r: {"n": len(r["text"])})
    assert any(p.name.startswith("cache-") for p in (tmp_path / "ds" / "train").iterdir())
    (tmp_path / "ds" / "test" / "notes.txt").write_text("a change to another split")
    assert fingerprint() == before
    save(tmp_path / "other", texts[:49] + ["some text number 49 HERE"])
    assert fingerprint(tmp_path / "other") != before


def test_a_token_stream_fingerprint_reads_a_json_source_as_text_not_whole(tmp_path, monkeypatch):
    """A single-file source named *.json was read whole for the fingerprint; only a
    saved dataset's metadata files are. And prefix=7 (not a list) names the argument."""
    from pathlib import Path

    from l3d_lens.streaming import TokenStream

    source = tmp_path / "corpus.json"
    source.write_text(json.dumps(["a line of text\n"] * 20_000))
    real = Path.read_bytes
    read = []
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self) or real(self))
    TokenStream(source, lambda s: [ord(c) % 19 for c in s], seq_len=8, batch_size=2).fingerprint()
    assert read == []
    with pytest.raises(TypeError, match=r"prefix must be a sequence of token ids"):
        TokenStream(source, lambda s: [1], seq_len=8, batch_size=2, prefix=7)
