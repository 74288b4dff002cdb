"""Loading checks found missing in review: the shipped two-task model's probe and the TL-layout
weights' shapes and names (zoo), a toy save that fails over an earlier one, a hand-edited
toy.safetensors (tensor set, shapes, dtypes, finiteness), and a malformed cli_inputs.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from l3d_lens.cli import RECORD, UserError, _read_record, main
from l3d_lens.toy import load_toy, saving
from l3d_lens.toy.train import make_toy
from l3d_lens.zoo import induction, two_tasks

torch.set_num_threads(1)


# --- zoo ------------------------------------------------------------------------------------------


def _damaged_copy(tmp_path, module, change):
    """A copy of ``module``'s shipped default assets with ``change`` applied to its weights dict."""
    folder = tmp_path / "assets"
    shutil.copytree(module._asset_dir(), folder)
    weights = load_file(str(folder / "model.safetensors"))
    change(weights)
    save_file(weights, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("module", [two_tasks, induction], ids=["two_tasks", "induction"])
def test_a_damaged_shipped_model_of_the_right_shapes_is_refused_by_its_probe(tmp_path, monkeypatch, module):
    def rows_equal(w):  # every input row of W_V the same: the shape a broadcast copy would leave
        w["blocks.0.attn.W_V"] = w["blocks.0.attn.W_V"][:, :1].expand_as(w["blocks.0.attn.W_V"]).contiguous()

    folder = _damaged_copy(tmp_path, module, rows_equal)
    monkeypatch.setattr(module, "_asset_dir", lambda variant="default": folder)
    message = f"{re.escape(str(folder))}: the (sum of the )?loaded model's probe logits differ"
    with pytest.raises(RuntimeError, match=message):
        module.load()


@pytest.mark.parametrize("module", [two_tasks, induction], ids=["two_tasks", "induction"])
def test_a_shipped_weight_of_a_broadcastable_shape_is_refused_naming_it(tmp_path, monkeypatch, module):
    folder = _damaged_copy(tmp_path, module, lambda w: w.__setitem__("blocks.0.attn.W_V",
                                                                     w["blocks.0.attn.W_V"][:, :1].clone()))
    monkeypatch.setattr(module, "_asset_dir", lambda variant="default": folder)
    H, d_head = module.CONFIG["n_heads"], module.CONFIG["d_head"]
    with pytest.raises(ValueError, match=(rf"blocks\.0\.attn\.W_V has shape \({H}, 1, {d_head}\), the model's is "
                                          rf"\({H}, {module.CONFIG['d_model']}, {d_head}\)")):
        module.load()


def test_load_tl_weights_refuses_unknown_keys_naming_them_and_lets_a_zero_missing_bias_pass():
    model = induction.build()
    weights = induction.state_dict_tl(model)
    with pytest.raises(ValueError, match=r"weights given for \['extra\.weight'\], which this model does not have"):
        induction.load_tl_weights(model, {**weights, "extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"weights given for \['blocks\.0\.attn\.b_X'\]"):
        induction.load_tl_weights(model, {**weights, "blocks.0.attn.b_X": torch.ones(3)})
    # an all-zero bias the model lacks changes nothing (TL 4's native model has no b_U)
    assert induction.load_tl_weights(model, {**weights, "blocks.0.attn.b_X": torch.zeros(3)}) is model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("module", [two_tasks, induction], ids=["two_tasks", "induction"])
def test_every_shipped_variant_still_loads(module, dtype):
    for variant in module.VARIANTS:
        module.load(dtype=dtype, variant=variant)


# --- toys ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toys():
    return [make_toy("tmcs", seed, epochs=1, n_train=64, n_l3d=8, n_eval=8) for seed in (0, 1)]


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("target", ["write_safetensors", "_sha256"])
def test_a_failed_save_leaves_the_earlier_toy_as_it_was(tmp_path, monkeypatch, toys, target):
    folder = toys[0].save(tmp_path / "toy")
    (folder / "notes.txt").write_text("mine")
    before = _files(folder)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(saving, target, boom)
    with pytest.raises(OSError, match="disk full"):
        toys[1].save(folder)
    monkeypatch.undo()
    assert _files(folder) == before  # nothing changed, no temporary file left
    assert load_toy(folder).seed == 0
    toys[1].save(folder)
    assert load_toy(folder).seed == 1 and (folder / "notes.txt").read_text() == "mine"


def test_a_save_stopped_between_its_two_moves_leaves_a_folder_that_is_refused(tmp_path, monkeypatch, toys):
    folder = toys[0].save(tmp_path / "toy")
    real, moves = saving.os.replace, []

    def replace(src, dst):  # no move after the first happens (nor the restore), as after a hard kill
        moves.append(dst)
        if len(moves) >= 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(saving.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        toys[1].save(folder)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="toy.safetensors is not the file toy.json was saved with"):
        load_toy(folder)


def _edited(tmp_path, toy, name, change):
    """``toy`` saved, its tensors changed and the JSON's sha256 updated to match (a re-save by hand)."""
    folder = toy.save(tmp_path / name)
    with safe_open(str(folder / "toy.safetensors"), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(folder / "toy.safetensors"), metadata=header)
    meta = json.loads((folder / "toy.json").read_text())
    meta["sha256"] = hashlib.sha256((folder / "toy.safetensors").read_bytes()).hexdigest()
    (folder / "toy.json").write_text(json.dumps(meta))
    return folder


def _nan_first(key):
    def change(t):
        t[key] = t[key].clone()
        t[key].view(-1)[0] = float("nan")
    return change


EDITS = [
    ("l3d_data removed", lambda t: t.pop("l3d_data"), r"expected for 'tmcs'; missing \['l3d_data'\]"),
    ("truth.A removed", lambda t: t.pop("truth.A"), r"missing \['truth\.A'\]"),
    ("extra tensor", lambda t: t.__setitem__("junk", torch.zeros(1)), r"unknown \['junk'\]"),
    ("extra truth", lambda t: t.__setitem__("truth.B", torch.zeros(1)), r"unknown \['truth\.B'\]"),
    ("truth.A wrong shape", lambda t: t.__setitem__("truth.A", torch.zeros(2, 2)),
     r"truth\.A has shape \(2, 2\); 'tmcs' needs \(10, 10\)"),
    ("l3d_data int64", lambda t: t.__setitem__("l3d_data", t["l3d_data"].long()),
     "l3d_data is torch.int64; a toy's tensors are floating point"),
    ("eval_data no rows", lambda t: t.__setitem__("eval_data", t["eval_data"][:0].contiguous()),
     r"eval_data has shape \(0, 10\); the model takes \[n, 10\] with n >= 1"),
    ("l3d_data NaN", _nan_first("l3d_data"), "l3d_data holds NaN or infinite values"),
    ("weight NaN", _nan_first("model.encoder.weight"), "model.encoder.weight holds NaN or infinite values"),
    ("truth.A inf", lambda t: t.__setitem__("truth.A", t["truth.A"] / 0), "truth.A holds NaN or infinite values"),
]


@pytest.mark.parametrize("name, change, message", EDITS, ids=[e[0] for e in EDITS])
def test_a_hand_edited_toy_tensors_file_is_refused_naming_the_tensor(tmp_path, toys, name, change, message):
    folder = _edited(tmp_path, toys[0], name, change)
    with pytest.raises(ValueError, match=f"{re.escape(str(folder))}: .*{message}"):
        load_toy(folder)


def test_saving_refuses_tensors_that_loading_would_refuse_before_touching_the_folder(tmp_path, toys):
    folder = toys[0].save(tmp_path / "toy")
    before = _files(folder)
    bad = dataclasses.replace(toys[1], l3d_data=toys[1].l3d_data.clone())
    bad.l3d_data[0, 0] = float("inf")
    with pytest.raises(ValueError, match="cannot save this toy: l3d_data holds NaN or infinite values"):
        bad.save(folder)
    with pytest.raises(ValueError, match=r"cannot save this toy: .*missing \['truth\.A'\]"):
        dataclasses.replace(toys[1], truth={}).save(folder)
    assert _files(folder) == before


def test_a_toy_made_by_hand_keeps_its_own_truth_tensors(tmp_path, toys):
    extra, groups = torch.arange(6.0).reshape(2, 3), torch.tensor([0, 0, 1])
    by_hand = dataclasses.replace(toys[0], seed=None, truth={"B": extra, "groups": groups})
    back = load_toy(by_hand.save(tmp_path / "toy"))
    assert back.truth.keys() == {"B", "groups"}
    assert torch.equal(back.truth["B"], extra) and torch.equal(back.truth["groups"], groups)
    with pytest.raises(ValueError, match=r"cannot save this toy: truth\.A has shape \(3,\); 'tmcs' needs \(10, 10\)"):
        dataclasses.replace(by_hand, truth={"A": torch.zeros(3)}).save(tmp_path / "other")


def test_a_toy_made_by_hand_may_have_no_held_out_rows_and_its_own_truth_may_hold_nan(tmp_path, toys):
    """What saved and loaded before the tensor checks still does: a hand-made toy without
    held-out rows, and its own truth tensor with a NaN (e.g. the r^2 of a feature never active);
    a toy with a seed still needs rows, and its own truth (TMCS's A) finite."""
    r2 = torch.tensor([float("nan"), 0.9])
    by_hand = dataclasses.replace(toys[0], seed=None, eval_data=toys[0].eval_data[:0], truth={"r2": r2})
    back = load_toy(by_hand.save(tmp_path / "toy"))
    assert back.eval_data.shape == (0, toys[0].eval_data.shape[1]) and torch.equal(back.truth["r2"].isnan(), r2.isnan())
    with pytest.raises(ValueError, match="with n >= 1"):
        dataclasses.replace(toys[0], eval_data=toys[0].eval_data[:0]).save(tmp_path / "seeded")


# --- cli_inputs.json ----------------------------------------------------------------------------


BAD_RECORDS = [
    ("[1]", "must hold a JSON object \\(as decompose writes it\\), got \\[1\\]"),
    ('{"model": "induction", "seed": "x"}', "'seed' must be an integer \\(the data seed\\), got 'x'"),
    ('{"seed": true}', "'seed' must be an integer"),
    ('{"model": 3}', "'model' must be a non-empty string"),
    ('{"model_class": "keras"}', "'model_class' must be one of 'auto', 'hooked', 'bridge', got 'keras'"),
    ('{"data": "a.txt"}', "'data' must be a list of paths \\(strings\\), got 'a.txt'"),
    ('{"data": ["a.txt", 3]}', "'data' must be a list of paths"),
    ('{"seq_len": 2.5}', "'seq_len' must be an integer or null, got 2.5"),
    ('{"text_column": []}', "'text_column' must be a string or null"),
    ('{"split": 1}', "'split' must be a string or null"),
]


@pytest.mark.parametrize("text, message", BAD_RECORDS, ids=[r[0] for r in BAD_RECORDS])
def test_a_malformed_record_is_one_error_line_naming_the_file_and_field(capsys, tmp_path, text, message):
    folder = tmp_path / "dec"
    folder.mkdir()
    (folder / RECORD).write_text(text)
    code = main(["report", str(folder), "--out", str(tmp_path / "r.html"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"l3d-lens report: error: {folder / RECORD}")
    assert re.search(message, err), err


def test_a_record_that_is_not_utf8_names_the_file_and_a_good_one_reads_back(tmp_path):
    (tmp_path / RECORD).write_bytes(b'{"model": "\xff"}')
    with pytest.raises(UserError, match=f"{re.escape(str(tmp_path / RECORD))}: not a UTF-8 JSON file"):
        _read_record(tmp_path)
    record = {"model": "induction", "model_class": "auto", "data": [], "seed": 3, "seq_len": None,
              "max_sequences": 16, "text_column": None, "split": None}
    (tmp_path / RECORD).write_text(json.dumps(record))
    assert _read_record(tmp_path) == record


def test_tl_layout_weights_refuse_a_model_whose_grouped_query_k_and_v_they_cannot_carry():
    """A grouped-query model's K and V have no TL-layout weight here: state_dict_tl left them out
    and load_tl_weights left the target's own, so a round trip "loaded" a different model."""
    from l3d_lens.zoo.induction import load_tl_weights, state_dict_tl

    from .helpers import HAS_HOOKED, tiny_lm

    kind = "hooked" if HAS_HOOKED else "bridge"
    source, target = (tiny_lm(kind, seed=s, n_key_value_heads=1) for s in (0, 1))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="state_dict_tl cannot carry this model's parameters"):
        state_dict_tl(source)
    full = state_dict_tl(tiny_lm(kind, seed=0))
    with pytest.raises(ValueError, match="load_tl_weights cannot carry this model's parameters"):
        load_tl_weights(target, full)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    plain = tiny_lm(kind, seed=1)
    load_tl_weights(plain, full)
    x = torch.randint(0, 20, (2, 6))
    assert torch.allclose(plain(x), tiny_lm(kind, seed=0)(x))


def test_tl_weights_round_trip_exactly_between_raw_and_compatibility_mode_bridges():
    """``state_dict_tl`` of a TransformerBridge in compatibility mode, loaded into a fresh bridge
    (raw or in compatibility mode), gives the same logits bit for bit. Compatibility mode itself
    changes the logits (it centres the unembedding and folds the value biases into b_O) by a
    constant per position only, so the log-probabilities agree to float32 rounding."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = induction.load("bridge")
    tokens = induction.repeated_sequences(4, seed=0)
    with torch.no_grad():
        raw = model(tokens)
        model.enable_compatibility_mode()
        compat = model(tokens)
        weights = induction.state_dict_tl(model)
        for mode in ("raw", "compat"):
            fresh = induction.build("bridge")
            if mode == "compat":
                fresh.enable_compatibility_mode()
            assert torch.equal(induction.load_tl_weights(fresh, weights)(tokens), compat), mode
    assert (compat - raw).abs().max() > 0.1
    torch.testing.assert_close(compat.log_softmax(-1), raw.log_softmax(-1), rtol=0, atol=1e-4)
