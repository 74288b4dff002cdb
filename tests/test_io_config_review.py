"""Review fixes: loading refuses incomplete or corrupt saved decompositions with a clear
ValueError, warns about a newer l3d_lens, and L3DConfig refuses booleans for numbers and
round-trips per-weight tuple ranks."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from l3d_lens import Decomposition, L3DConfig, decompose

from .helpers import HAS_HOOKED, TinyMLP, tiny_lm, tokens

torch.set_num_threads(1)

RANK = {"fc1.weight": (2, 3), "default": 2}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, model, decomposition) of a small MLP decomposition with a per-weight tuple rank."""
    model = TinyMLP(dtype=torch.float32)
    dec = decompose(model, torch.rand(16, 5, generator=torch.Generator().manual_seed(0)),
                    L3DConfig(components=["fc1", "fc2"], n_subnetworks=3, rank=RANK, epochs=1), progress=False)
    path = tmp_path_factory.mktemp("saved") / "dec"
    dec.save(path)
    return path, model, dec


def copy_with(saved, tmp_path, tensors=None, meta=None, text=None):
    """A copy of the saved decomposition with its factors edited by ``tensors`` (a function of
    the dict) and/or its JSON by ``meta`` (a function of the dict) or replaced by ``text``."""
    src = saved[0]
    dst = tmp_path / "edited"
    dst.mkdir()
    factors = load_file(str(src / "factors.safetensors"))
    if tensors is not None:
        tensors(factors)
    save_file(factors, str(dst / "factors.safetensors"))
    data = json.loads((src / "decomposition.json").read_text())
    if meta is not None:
        meta(data)
    (dst / "decomposition.json").write_text(text if text is not None else json.dumps(data))
    return dst


def _set(k, v):
    return lambda f: f.__setitem__(k, v)


@pytest.mark.parametrize("edit, match", [
    (lambda f: f.pop("out/fc1.weight/U1"), r"factors\.safetensors.*lacks 'out/fc1\.weight/U1'"),
    (lambda f: f.pop("in/fc2.bias/core"), r"lacks 'in/fc2\.bias/core'"),
    (_set("out/fc1.weight/U1", torch.zeros(3, 5, 2)),
     r"'out/fc1\.weight/U1' has shape \(3, 5, 2\); expected \(3, 5, 3\)"),
    (_set("in/fc2.weight/U0", torch.zeros(3, 4, 2)), r"'in/fc2\.weight/U0' has shape \(3, 4, 2\); expected \(3, 5, 2\)"),
    (_set("out/fc1.weight/core", torch.zeros(3, 2, 2)), r"'out/fc1\.weight/core' has shape .*expected \(3, 2, 3\)"),
    (_set("out/fc1.weight/U0", torch.zeros(3, 4, 2, dtype=torch.int32)),
     r"'out/fc1\.weight/U0' has dtype torch\.int32; expected a floating"),
    (lambda f: f["in/fc1.weight/U1"].__setitem__((0, 0, 0), float("nan")), r"'in/fc1\.weight/U1' holds NaN or inf"),
    (lambda f: f["out/fc2.bias/U0"].__setitem__((1, 2, 0), float("inf")), r"'out/fc2\.bias/U0' holds NaN or inf"),
    (_set("out/fc1.weight/U2", torch.zeros(3, 1, 1)),
     r"unexpected tensors \['out/fc1\.weight/U2'\]"),
    (_set("in/scale/core", torch.zeros(3, 1)), r"unexpected tensors \['in/scale/core'\]"),
])
def test_every_factor_is_checked_when_loading(saved, tmp_path, edit, match):
    path = copy_with(saved, tmp_path, tensors=edit)
    with pytest.raises(ValueError, match=match):
        Decomposition.load(path, saved[1])


def test_an_unreadable_factors_file_is_a_value_error(saved, tmp_path):
    path = copy_with(saved, tmp_path)
    (path / "factors.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"factors\.safetensors is not a readable safetensors file"):
        Decomposition.load(path, saved[1])


@pytest.mark.parametrize("key", ["config", "adapter", "weights", "fingerprint", "history", "versions"])
def test_a_missing_json_key_is_named(saved, tmp_path, key):
    path = copy_with(saved, tmp_path, meta=lambda m: m.pop(key))
    with pytest.raises(ValueError, match=rf"decomposition\.json lacks the keys \['{key}'\]"):
        Decomposition.load(path, saved[1])


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.__setitem__("history", {}), r"decomposition\.json: 'history' must be a list, got \{\}"),
    (lambda m: m.__setitem__("config", None), r"'config' must be a dict"),
    (lambda m: m["fingerprint"].pop("sha256"), r"'fingerprint' must be a dict with 'shapes' and 'sha256'"),
    (lambda m: m["config"].pop("components"), r"decomposition\.json, 'config': .*components"),
    (lambda m: m["config"].__setitem__("top_k", 7), r"decomposition\.json, 'config': top_k must be"),
])
def test_a_bad_json_value_is_named(saved, tmp_path, edit, match):
    path = copy_with(saved, tmp_path, meta=edit)
    with pytest.raises(ValueError, match=match):
        Decomposition.load(path, saved[1])


@pytest.mark.parametrize("text, match", [
    ('{"config": ', r"decomposition\.json is not valid JSON"),
    ("[1, 2]", r"decomposition\.json holds a JSON list, not"),
])
def test_unparseable_json_is_a_value_error(saved, tmp_path, text, match):
    path = copy_with(saved, tmp_path, text=text)
    with pytest.raises(ValueError, match=match):
        Decomposition.load(path, saved[1])


def test_a_newer_l3d_lens_warns_and_older_or_other_versions_do_not(saved, tmp_path):
    def with_version(v):
        return lambda m: m["versions"].__setitem__("l3d_lens", v)

    newer = copy_with(saved, tmp_path, meta=with_version("99.0"))
    with pytest.warns(UserWarning, match=r"saved by l3d_lens 99\.0, newer than the installed"):
        loaded = Decomposition.load(newer, saved[1])
    assert loaded.cfg == saved[2].cfg
    for v in ("0.0.1", "0.1.7", "unknown"):
        (newer / "decomposition.json").write_text(
            json.dumps({**json.loads((newer / "decomposition.json").read_text()),
                        "versions": {"l3d_lens": v, "transformer_lens": "0.0", "torch": "99.0"}}))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            Decomposition.load(newer, saved[1])


def test_loads_saved_from_another_adapter_kind_without_a_word(saved, tmp_path):
    path = copy_with(saved, tmp_path, meta=lambda m: m.__setitem__("adapter", "transformer_bridge"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Decomposition.load(path, saved[1]).cfg == saved[2].cfg


@pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer was removed in TransformerLens 4")
def test_a_hooked_transformer_decomposition_loads_onto_a_bridge(tmp_path):
    hooked, bridge = tiny_lm("hooked", dtype=torch.float32), tiny_lm("bridge", dtype=torch.float32)
    dec = decompose(hooked, tokens(8, 6), L3DConfig(components="blocks.0.attn.W_Q", n_subnetworks=2, rank=2,
                                                    epochs=1, batch_size=4), progress=False)
    dec.save(tmp_path / "d")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = Decomposition.load(tmp_path / "d", bridge, check_weights=False)
    assert loaded.cfg == dec.cfg and loaded.weight_names == dec.weight_names


def test_a_saved_tuple_rank_loads_back_equal(saved):
    path, model, dec = saved
    assert dec.cfg.rank == RANK
    assert Decomposition.load(path, model).cfg == dec.cfg


def test_config_round_trips_tuple_ranks_and_lists_become_tuples():
    cfg = L3DConfig(components="blocks.0.attn", rank={"blocks.0.attn.W_Q": (2, 3, 2), "default": 0.5})
    assert L3DConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    listed = L3DConfig(components="blocks.0.attn", rank={"blocks.0.attn.W_Q": [2, 3, 2], "default": 0.5})
    assert listed.rank["blocks.0.attn.W_Q"] == (2, 3, 2) and listed == cfg
    assert cfg.to_dict()["rank"]["blocks.0.attn.W_Q"] == [2, 3, 2]


@pytest.mark.parametrize("field, value", [
    ("n_subnetworks", True), ("top_k", True), ("lr_decay", True), ("aux_coef", True), ("aux_coef", False),
    ("dead_steps", True), ("seed", True), ("seed", False), ("lr", True), ("epochs", True),
])
def test_config_refuses_booleans_for_numbers(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must .*got {value}$"):
        L3DConfig(components="blocks.0.attn", **{field: value})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1])
def test_config_refuses_a_non_finite_or_negative_aux_coef(value):
    with pytest.raises(ValueError, match="aux_coef must be a finite number >= 0"):
        L3DConfig(components="blocks.0.attn", aux_coef=value)


def test_the_newer_version_warning_points_at_the_caller(saved, tmp_path):
    path = copy_with(saved, tmp_path, meta=lambda m: m["versions"].__setitem__("l3d_lens", "0.2.0"))
    with pytest.warns(UserWarning, match="newer than the installed") as record:
        Decomposition.load(path, saved[1])
    assert record[0].filename == __file__
