"""load_toy's checks of toy.json: a damaged or hand-edited JSON is refused with one ValueError
naming the file, the field and what it must be, before a tensor is read; a JSON edited after
saving (seed, truth, blocks) is refused against the copy in the tensors file's header; and
save_toy refuses a toy whose fields load_toy would refuse.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from l3d_lens.toy import load_toy, saving
from l3d_lens.toy.train import MAX_SAVED_SEED, make_toy

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tmcs_toy():
    return make_toy("tmcs", 0, epochs=2, n_train=200, n_l3d=50, n_eval=50)


def _edit(folder, change):
    """Rewrite folder/toy.json as ``change(meta)`` returns it (a str is written as it is)."""
    meta = json.loads((folder / "toy.json").read_text())
    new = change(meta)
    (folder / "toy.json").write_text(new if isinstance(new, str) else json.dumps(new))


def _without(key):
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def _with(**fields):
    return lambda meta: {**meta, **fields}


DAMAGED = [
    (lambda meta: "", r"is not valid JSON \(Expecting value"),
    (lambda meta: json.dumps(meta)[:40], r"is not valid JSON"),
    (lambda meta: [meta], r"holds a JSON list, not the object save_toy writes"),
    (_without("seed"), r"lacks the keys \['seed'\], which save_toy always writes"),
    (_without("blocks"), r"lacks the keys \['blocks'\]"),
    (_without("sha256"), r"lacks the keys \['sha256'\]"),
    (_with(format_version=True), r"toy format version True; this l3d_lens reads 1"),
    (_with(name=["tmcs"]), r"unknown toy model \['tmcs'\]; choose one of"),
    (_with(seed="zero"), rf"seed must be an integer in 0\.\.{MAX_SAVED_SEED} \(make_toy's seed; null for a toy made by "
                         r"hand\), got 'zero'"),
    (_with(seed=-5), r"seed must be an integer in 0\.\.\d+ .*got -5"),
    (_with(seed=MAX_SAVED_SEED + 1), rf"seed must be an integer in 0\.\.\d+ .*got {MAX_SAVED_SEED + 1}"),
    (_with(seed=0.0), r"seed must be an integer .*got 0\.0"),
    (_with(seed=False), r"seed must be an integer .*got False"),
    (_with(blocks="x"), r"blocks must be an integer >= 1 \(blocks of starts trained\), got 'x'"),
    (_with(blocks=0), r"blocks must be an integer >= 1 .*got 0"),
    (_with(train_losses="abc"), r"train_losses must be a list of floats \(the loss of every epoch\), got 'abc'"),
    (_with(train_losses=[0.5, "x"]), r"train_losses\[1\] must be a float \(NaN and Infinity allowed\), got 'x'"),
    (_with(truth=[]), r"truth must be an object \(the ground truth that is not a tensor\), got \[\]"),
    (_with(model_class=None), r"model_class must be a string \(the model's class name\), got None"),
    (_with(sha256="abc"), r"sha256 must be 64 hex digits \(the sha256 of toy.safetensors\), got 'abc'"),
    (_with(versions="x"), r"versions must be an object, got 'x'"),
]


@pytest.mark.parametrize("change, message", DAMAGED)
def test_a_damaged_toy_json_is_refused_naming_the_file_and_field_before_any_tensor_is_read(
        tmp_path, monkeypatch, tmcs_toy, change, message):
    folder = tmcs_toy.save(tmp_path / "toy")
    _edit(folder, change)

    def no_tensors(*args, **kwargs):
        raise AssertionError("load_toy read the tensors of a toy whose JSON it should have refused")

    monkeypatch.setattr(saving, "safe_open", no_tensors)
    with pytest.raises(ValueError, match=re.escape(str(folder / "toy.json")) + r"(: | )" + message):
        load_toy(folder)


@pytest.mark.parametrize("fields, saved", [
    ({"seed": 7}, "seed=0, the JSON says seed=7"),
    ({"blocks": 2}, "blocks=1, the JSON says blocks=2"),
    ({"train_losses": [0.0, 0.0]}, "train_losses=["),
])
def test_a_toy_json_edited_after_saving_is_refused(tmp_path, tmcs_toy, fields, saved):
    folder = tmcs_toy.save(tmp_path / "toy")
    meta = json.loads((folder / "toy.json").read_text())
    _edit(folder, _with(**fields))
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'toy.json'} was edited after saving: toy.safetensors "
                                                   f"was saved with {saved}")):
        load_toy(folder)  # an edited seed would rebuild another input distribution than the data's
    with safe_open(str(folder / "toy.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["toy"]) == {k: meta[k] for k in saving.TOY_FIELDS}


def test_an_edited_truth_is_refused_and_a_toy_saved_without_the_header_copy_still_loads(tmp_path):
    toy = make_toy("higher_rank", 0, epochs=2, n_train=200, n_l3d=50, n_eval=50)
    folder = toy.save(tmp_path / "toy")
    _edit(folder, lambda meta: {**meta, "truth": {"group_size": 1}})
    with pytest.raises(ValueError, match=r"was edited after saving: toy.safetensors was saved with "
                                         r"truth=\{'group_size': 5\}, the JSON says truth=\{'group_size': 1\}"):
        load_toy(folder)
    # a toy saved before the header held the JSON fields is checked field by field only
    save_file(load_file(str(folder / "toy.safetensors")), str(folder / "toy.safetensors"),
              metadata={"format_version": "1"})
    sha = saving._sha256(folder / "toy.safetensors")
    _edit(folder, lambda meta: {**meta, "truth": {"group_size": 5}, "sha256": sha})
    back = load_toy(folder)
    assert back.truth["group_size"] == 5 and torch.equal(back.truth["A"], toy.truth["A"])


def test_saving_refuses_fields_that_loading_would_refuse(tmp_path, tmcs_toy):
    folder = tmp_path / "toy"
    for bad, message in ((dict(seed=-5), r"seed must be an integer in 0\.\.\d+ .*got -5"),
                         (dict(seed=1.5), r"seed must be an integer in 0\.\.\d+ .*got 1\.5"),
                         (dict(seed=MAX_SAVED_SEED + 1), rf"seed must be an integer .*got {MAX_SAVED_SEED + 1}"),
                         (dict(blocks=0), r"blocks must be an integer >= 1 .*got 0")):
        with pytest.raises(ValueError, match="cannot save this toy: " + message):
            dataclasses.replace(tmcs_toy, **bad).save(folder)
        assert not folder.exists()  # refused before the folder was touched
    losses = [0.5, math.nan, math.inf]  # a diverged run's losses save and load
    back = load_toy(dataclasses.replace(tmcs_toy, train_losses=losses).save(folder))
    assert back.train_losses[0] == 0.5 and math.isnan(back.train_losses[1]) and back.train_losses[2] == math.inf
    assert "MSE inf" in repr(back) and back.seed == 0 and back.blocks == 1
