"""Review fixes of Decomposition save/load (third round): a save records the model as the
decomposition was computed on it, not as it is when saved; a hand-edited decomposition.json is
refused; a damaged history is refused by a save and a resumed checkpoint; saved weights and
model dtypes are checked, and load's errors name the file; a dangling symlink is named; the
leftovers of a killed save are removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from l3d_lens import Decomposition, L3DConfig, decompose
from l3d_lens import io

from .helpers import TinyMLP

torch.set_num_threads(1)

CFG = L3DConfig(components=["fc1", "fc2"], n_subnetworks=3, rank=2, epochs=1, include_biases=False)
DATA = torch.rand(16, 5, generator=torch.Generator().manual_seed(0))


def fresh():
    """(model, its decomposition): a new pair, for tests that change the model."""
    model = TinyMLP(dtype=torch.float32)
    return model, decompose(model, DATA, CFG, progress=False)


@pytest.fixture(scope="module")
def pair():
    return fresh()


def edit_json(folder: Path, edit) -> Path:
    file = folder / "decomposition.json"
    meta = json.loads(file.read_text())
    edit(meta)
    file.write_text(json.dumps(meta))
    return folder


# --- 1. the model a save records -------------------------------------------------------------------

def test_a_save_records_the_weights_it_was_computed_on_not_those_edited_since(tmp_path):
    model, dec = fresh()
    with torch.no_grad():
        model.fc1.weight.mul_(2.0)
    with pytest.warns(UserWarning, match=r"the model changed since .*\(the decomposed weights\).*as it was then"):
        dec.save(tmp_path / "d")
    assert Decomposition.load(tmp_path / "d", TinyMLP(dtype=torch.float32)).n_subnetworks == 3
    with pytest.raises(ValueError, match="weights differ from those the decomposition was computed on"):
        Decomposition.load(tmp_path / "d", model)


def test_a_save_records_the_dtype_it_was_computed_in(tmp_path):
    model, dec = fresh()
    model.double()
    with pytest.warns(UserWarning, match=r"its dtype: float32 then, float64 now"):
        dec.save(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "decomposition.json").read_text())["model_dtype"] == "float32"
    assert Decomposition.load(tmp_path / "d", TinyMLP(dtype=torch.float32)).n_subnetworks == 3


def test_a_loaded_decomposition_saves_the_record_it_was_loaded_with(pair, tmp_path):
    model, dec = pair
    dec.save(tmp_path / "a")
    edited = TinyMLP(dtype=torch.float32)
    with torch.no_grad():
        edited.scale.add_(1.0)
    loaded = Decomposition.load(tmp_path / "a", edited, check_weights=False)
    with pytest.warns(UserWarning, match=r"the parameters outside the decomposed weights"):
        loaded.save(tmp_path / "b")
    assert Decomposition.load(tmp_path / "b", model).n_subnetworks == 3
    with pytest.raises(ValueError, match="parameters outside the decomposed weights differ"):
        Decomposition.load(tmp_path / "b", edited)


def test_a_decomposition_built_without_a_record_saves_the_model_as_it_is(pair, tmp_path, recwarn):
    model, dec = pair
    Decomposition(dec._task, dec.factors, dec.history).save(tmp_path / "d")
    assert not [w for w in recwarn if "changed since" in str(w.message)]
    assert Decomposition.load(tmp_path / "d", model).n_subnetworks == 3


# --- 2. a hand-edited JSON -------------------------------------------------------------------------

@pytest.mark.parametrize("edit, check_weights", [
    (lambda m: m["config"].__setitem__("reference", "zero"), True),
    (lambda m: m["config"].__setitem__("top_k", 0.9), True),
    (lambda m: m["config"].__setitem__("lr", 0.5), True),
    (lambda m: m["config"].__setitem__("epochs", 7), True),
    (lambda m: m["history"][0].__setitem__("loss", 0.001), True),
    (lambda m: m["fingerprint"].__setitem__("sha256", "0" * 64), False),
    (lambda m: m.__setitem__("model_dtype", "float64"), False),
], ids=["reference", "top_k", "lr", "epochs", "history", "fingerprint", "model_dtype"])
def test_an_edited_json_is_refused(pair, tmp_path, edit, check_weights):
    model, dec = pair
    dec.save(tmp_path / "d")
    edit_json(tmp_path / "d", edit)
    with pytest.raises(ValueError, match=r"decomposition\.json is not the JSON .*factors\.safetensors was saved with "
                                         r".*edited after saving, or belongs to other factors"):
        Decomposition.load(tmp_path / "d", model, check_weights=check_weights)


def test_an_edited_json_of_a_save_before_the_header_recorded_it_loads(pair, tmp_path):
    model, dec = pair
    dec.save(tmp_path / "d")
    factors = tmp_path / "d" / "factors.safetensors"
    save_file(load_file(str(factors)), str(factors), metadata={"format_version": "1"})  # as saved before
    edit_json(tmp_path / "d", lambda m: m["config"].__setitem__("top_k", 0.9))
    assert Decomposition.load(tmp_path / "d", model).cfg.top_k == 0.9


def test_the_saved_device_may_be_edited(pair, tmp_path):
    model, dec = pair
    dec.save(tmp_path / "d")
    edit_json(tmp_path / "d", lambda m: m["config"].__setitem__("device", "cpu"))
    assert Decomposition.load(tmp_path / "d", model).cfg.device == "cpu"


# --- 3. a damaged history --------------------------------------------------------------------------

@pytest.mark.parametrize("index, key, value, match", [
    (1, "loss", "oops", r"'history'\[1\]\['loss'\] must be a number"),
    (0, "p_act", [7.0], r"'history'\[0\]\['p_act'\] must be a list of 3 fractions"),
])
def test_a_checkpoint_whose_history_is_damaged_is_refused(tmp_path, index, key, value, match):
    model, cfg = TinyMLP(dtype=torch.float32), CFG.replace(epochs=2, batch_size=4)
    decompose(model, DATA, cfg, progress=False, checkpoint=tmp_path)
    file = tmp_path / json.loads((tmp_path / "latest.json").read_text())["folder"] / "state.json"
    state = json.loads(file.read_text())
    state["history"][index][key] = value
    file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"state\.json: " + match + r".*this checkpoint cannot be resumed"):
        decompose(model, DATA, cfg, progress=False, checkpoint=tmp_path)


def test_a_damaged_history_is_refused_before_a_save_writes_anything(pair, tmp_path):
    model, dec = pair
    damaged = Decomposition(dec._task, dec.factors, [{**dec.history[0], "p_act": [7.0]}])
    with pytest.raises(ValueError, match=r"history cannot be saved .*'history'\[0\]\['p_act'\] must be a list"):
        damaged.save(tmp_path / "d")
    assert not (tmp_path / "d").exists()


# --- 4. the saved fields, and errors that name the file --------------------------------------------

@pytest.mark.parametrize("key, value, match", [
    ("weights", [["fc1.weight"]], r"'weights' must be a list of weight names \(strings\)"),
    ("model_dtype", "float33", r"'model_dtype' must be a dtype name such as 'float32', 'float64'"),
    ("model_dtype", "float", r"'model_dtype' must be a dtype name"),
])
@pytest.mark.parametrize("check_weights", [True, False])
def test_a_saved_field_of_the_wrong_kind_is_named(pair, tmp_path, key, value, match, check_weights):
    model, dec = pair
    dec.save(tmp_path / "d")
    edit_json(tmp_path / "d", lambda m: m.__setitem__(key, value))
    with pytest.raises(ValueError, match=r"decomposition\.json: " + match):
        Decomposition.load(tmp_path / "d", model, check_weights=check_weights)


@pytest.mark.parametrize("other, match", [
    (lambda: TinyMLP(d_hidden=6, dtype=torch.float32), "weight shapes differ"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(5, 5)), "the saved decomposition does not fit this model"),
], ids=["shapes", "no_fit"])
def test_errors_about_the_model_name_the_file(pair, tmp_path, other, match):
    _, dec = pair
    dec.save(tmp_path / "d")
    with pytest.raises(ValueError, match=r"decomposition\.json: " + match):
        Decomposition.load(tmp_path / "d", other())


def test_a_selection_that_differs_names_the_file(pair, tmp_path):
    model, dec = pair
    dec.save(tmp_path / "d")
    edit_json(tmp_path / "d", lambda m: m.__setitem__("weights", ["fc2.weight", "fc1.weight"]))
    with pytest.raises(ValueError, match=r"decomposition\.json: the saved decomposition covers"):
        Decomposition.load(tmp_path / "d", model)


# --- 5. a dangling symlink -------------------------------------------------------------------------

@pytest.mark.parametrize("below", [False, True], ids=["the_link", "a_folder_under_it"])
@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_saving_to_a_dangling_symlink_names_it(pair, tmp_path, below):
    _, dec = pair
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"link is a symbolic link to .*nowhere, which does not exist"):
        dec.save(link / "sub" if below else link)


# --- 6. the leftovers of a killed save -------------------------------------------------------------

@pytest.mark.skipif(os.name == "nt", reason="leftovers are not removed on Windows")
def test_a_save_removes_the_temporary_files_of_a_killed_save_only(pair, tmp_path):
    _, dec = pair
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = int(gone.stdout), os.getpid()
    folder = tmp_path / "d"
    folder.mkdir()
    stale = [f".factors.safetensors.{dead}.0123abcd.tmp", f".decomposition.json.{dead}.deadbeef.tmp"]
    kept = [f".factors.safetensors.{live}.0123abcd.tmp", f".factors.safetensors.{dead}.tmp", "notes.tmp",
            f"factors.safetensors.{dead}.0123abcd.tmp"]
    recent = [f".factors.safetensors.{dead}.89abcdef.tmp"]  # a save on another machine may still write it
    old = time.time() - io.LEFTOVER_AGE - 60
    for name in stale + kept + recent:
        (folder / name).write_text("x")
        if name not in recent:
            os.utime(folder / name, (old, old))
    dec.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept + recent + ["decomposition.json",
                                                                               "factors.safetensors"])


def test_a_failed_save_does_not_put_back_its_old_json_over_another_saves(pair, tmp_path, monkeypatch):
    """Save A's JSON is in when save B (another process) writes both its files, then A's factors'
    move fails: A put back the JSON from before both, beside B's factors, and the folder no longer
    loaded; now it leaves B's save, which loads."""
    model, dec = pair
    other = Decomposition(dec._task, {k: v * 2 for k, v in dec.factors.items()}, dec.history,
                          model_record=dec._model_record)
    folder = tmp_path / "d"
    dec.save(folder)
    real, moves = io.os.replace, []

    def replace(src, dst):
        moves.append(Path(dst).name)
        if moves == ["decomposition.json", "factors.safetensors"]:
            monkeypatch.setattr(io.os, "replace", real)
            other.save(folder)  # B, all of it, between A's two moves
            raise OSError("disk full (simulated)")
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        dec.save(folder)
    monkeypatch.undo()
    loaded = Decomposition.load(folder, model)
    assert all(torch.equal(loaded.factors[k], other.factors[k]) for k in other.factors)


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_a_checkpoint_folder_at_a_dangling_symlink_is_named_before_training(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"checkpoint=.*link'?: it is a symbolic link to .*nowhere, which does not "
                                         r"exist"):
        decompose(TinyMLP(dtype=torch.float32), DATA, CFG, progress=False, checkpoint=tmp_path / "link")
