"""A save that fails keeps the earlier one: a toy (``save_toy``) and a zoo model
(``induction.save``, ``two_tasks.save``), whose saves also no longer write into the installed
package unless told to (``path`` is required; the maintainer scripts pass ``asset_dir``)."""

import os
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from l3d_lens.toy import make_toy
from l3d_lens.toy.saving import load_toy
from l3d_lens.zoo import induction, two_tasks

ROOT = Path(__file__).resolve().parents[1]


def _fail_replace(monkeypatch, exc, from_call=2, until_call=2):
    """Make ``os.replace`` raise ``exc`` on calls ``from_call``..``until_call`` (1-based)."""
    real, calls = os.replace, [0]

    def replace(src, dst):
        calls[0] += 1
        if from_call <= calls[0] <= until_call:
            raise exc("simulated: a replace failed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- toy ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toys():
    torch.manual_seed(0)
    return [make_toy("tmcs", s, epochs=1, n_train=64, n_l3d=8, n_eval=8) for s in (0, 1)]


@pytest.mark.parametrize("exc", [OSError, KeyboardInterrupt])
def test_a_toy_save_failing_at_its_second_replace_keeps_the_earlier_toy(tmp_path, monkeypatch, toys, exc):
    t0, t1 = toys
    t0.save(tmp_path)
    before = _files(tmp_path)
    _fail_replace(monkeypatch, exc)
    with pytest.raises(exc, match="simulated"):
        t1.save(tmp_path)
    monkeypatch.undo()
    assert _files(tmp_path) == before  # the older toy's two files, as they were, and no temporary ones
    again = load_toy(tmp_path)
    assert again.seed == t0.seed
    assert torch.equal(again.l3d_data, t0.l3d_data) and torch.equal(again.eval_data, t0.eval_data)
    state = t0.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in again.model.state_dict().items())


def test_a_toy_save_cut_off_between_its_replaces_loads_as_an_error(tmp_path, monkeypatch, toys):
    t0, t1 = toys
    t0.save(tmp_path)
    _fail_replace(monkeypatch, KeyboardInterrupt, from_call=2, until_call=99)  # the JSON put back fails too
    with pytest.raises(KeyboardInterrupt):
        t1.save(tmp_path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="toy.safetensors is not the file toy.json was saved with"):
        load_toy(tmp_path)


# --- zoo: path required -----------------------------------------------------------------------------


@pytest.mark.parametrize("module, variant", [(induction, "default"), (induction, "redundant"),
                                             (two_tasks, "default"), (two_tasks, "unpruned")])
def test_a_zoo_save_without_a_path_names_the_choices_and_writes_nothing(tmp_path, monkeypatch, module, variant):
    shipped = module.asset_dir(variant)
    assert shipped == module._asset_dir(variant) and shipped.is_dir()
    before = _files(shipped)
    decoy = tmp_path / "assets"  # where the old save would have written, instead of the package
    decoy.mkdir()
    monkeypatch.setattr(module, "_asset_dir", lambda variant="default": decoy)
    model = module.build(seed=0) if module is two_tasks else module.build()
    name = module.__name__.rpartition(".")[2]
    with pytest.raises(TypeError, match=rf"{name}\.save needs path=.*{name}\.load\(path=\.\.\.\).*"
                                        rf"path={name}\.asset_dir\('{variant}'\)"):
        module.save(model, variant=variant)
    assert str(shipped) in str(pytest.raises(TypeError, module.save, model, None, variant).value)
    assert list(decoy.iterdir()) == [] and _files(shipped) == before


def test_a_zoo_save_of_an_unknown_variant_without_a_path_names_the_variants():
    with pytest.raises(ValueError, match=r"variant='pruned'; choose one of \['default', 'unpruned'\]"):
        two_tasks.save(two_tasks.build(), variant="pruned")


# --- zoo: a failed save keeps the earlier one --------------------------------------------------------


def _changed(model):
    weights = induction.state_dict_tl(model)
    weights["blocks.0.attn.W_V"] = weights["blocks.0.attn.W_V"] + 0.5
    return induction.load_tl_weights(model, weights)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("exc", [OSError, KeyboardInterrupt])
def test_an_induction_save_failing_at_its_second_replace_keeps_the_earlier_save(tmp_path, monkeypatch, exc):
    first = induction.load()
    induction.save(first, tmp_path)
    before = _files(tmp_path)
    _fail_replace(monkeypatch, exc)
    with pytest.raises(exc, match="simulated"):
        induction.save(_changed(induction.load()), tmp_path)
    monkeypatch.undo()
    assert _files(tmp_path) == before
    assert _same(induction.load(path=tmp_path), first)


def test_an_induction_save_cut_off_between_its_replaces_loads_as_an_error(tmp_path, monkeypatch):
    induction.save(induction.load(), tmp_path)
    _fail_replace(monkeypatch, KeyboardInterrupt, from_call=2, until_call=99)
    with pytest.raises(KeyboardInterrupt):
        induction.save(_changed(induction.load()), tmp_path)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="model.safetensors is not the file meta.json was saved with"):
        induction.load(path=tmp_path)


def test_two_tasks_saves_to_a_folder_loads_it_back_and_a_failed_save_keeps_it(tmp_path, monkeypatch):
    first = two_tasks.load()
    assert two_tasks.save(first, tmp_path) == tmp_path
    assert _same(two_tasks.load(path=tmp_path), first)
    before = _files(tmp_path)
    _fail_replace(monkeypatch, OSError)
    with pytest.raises(OSError, match="simulated"):
        two_tasks.save(_changed(two_tasks.load()), tmp_path)
    monkeypatch.undo()
    assert _files(tmp_path) == before
    assert _same(two_tasks.load(path=tmp_path), first)
    with pytest.raises(ValueError, match="either variant= .* or path="):
        two_tasks.load(variant="default", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no saved two-task model"):
        two_tasks.load(path=tmp_path / "missing")


# --- the maintainer scripts pass the asset folder -------------------------------------------------


def _record_saves(monkeypatch, module):
    saved = []
    monkeypatch.setattr(module, "save", lambda model, path=None, variant="default": saved.append(path) or path)
    return saved


def test_train_default_model_replace_shipped_saves_to_the_asset_folder(monkeypatch):
    saved = _record_saves(monkeypatch, induction)
    monkeypatch.setattr(induction, "train", lambda **kwargs: induction.load(variant="redundant"))
    monkeypatch.setattr(induction, "identify_circuit", lambda model: (set(), pd.DataFrame({"head": [0]})))
    monkeypatch.setattr(sys, "argv", ["train_default_model.py", "--variant", "redundant", "--replace-shipped"])
    runpy.run_path(str(ROOT / "scripts" / "train_default_model.py"), run_name="__main__")
    assert saved == [induction.asset_dir("redundant")]


def test_train_two_tasks_saves_each_variant_to_its_asset_folder(monkeypatch):
    saved = _record_saves(monkeypatch, two_tasks)
    monkeypatch.setattr(two_tasks, "train", lambda **kwargs: two_tasks.load(variant="unpruned"))
    monkeypatch.setattr(two_tasks, "head_ablation", lambda model: pd.DataFrame({"head": [0]}))
    monkeypatch.setattr(sys, "argv", ["train_two_tasks.py"])
    runpy.run_path(str(ROOT / "scripts" / "train_two_tasks.py"), run_name="__main__")
    assert saved == [two_tasks.asset_dir("unpruned"), two_tasks.asset_dir("default")]
