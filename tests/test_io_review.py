"""Review fixes of Decomposition save/load: a failed save leaves an earlier one as it was and
the two files of different saves never load as a mix; check_weights covers every parameter of
the model; load's device=; history entries, factor dtypes, divergence= and the format version
are checked with clear errors."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from l3d_lens import Decomposition, L3DConfig, decompose
from l3d_lens import io as l3d_io

from .helpers import TinyMLP, as_earlier_save

torch.set_num_threads(1)

CFG = L3DConfig(components=["fc1", "fc2"], n_subnetworks=3, rank=2, epochs=1, include_biases=False)
DATA = torch.rand(16, 5, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def decs():
    """(model, decomposition with seed 0, decomposition with seed 1): same shapes, other factors."""
    model = TinyMLP(dtype=torch.float32)
    return (model, decompose(model, DATA, CFG, progress=False),
            decompose(model, DATA, CFG.replace(seed=1), progress=False))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def edited(tmp_path: Path, dec, meta=None, tensors=None) -> Path:
    """A fresh save of ``dec`` with its JSON edited by ``meta`` and/or its factors by ``tensors``."""
    folder = tmp_path / "edited"
    dec.save(folder)
    if meta is not None:
        data = json.loads((folder / "decomposition.json").read_text())
        meta(data)
        (folder / "decomposition.json").write_text(json.dumps(data))
        as_earlier_save(folder)
    if tensors is not None:
        factors = load_file(str(folder / "factors.safetensors"))
        save_file(tensors(factors), str(folder / "factors.safetensors"))
    return folder


def assert_same(loaded, dec):
    assert loaded.cfg == dec.cfg and loaded.history == dec.history
    assert all(torch.equal(loaded.factors[k], dec.factors[k]) for k in dec.factors)


# --- 1. a failed save, and the files of two saves -------------------------------------------------

def _failing_replace(real=os.replace):
    def replace(src, dst):
        if Path(dst).name == "factors.safetensors":
            raise OSError("rename failed (simulated)")
        return real(src, dst)
    return replace


def _raise(*args, **kwargs):
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("target, attr, fake", [
    (Path, "write_text", _raise),  # the JSON's write
    (l3d_io, "write_safetensors", _raise),  # the factors' write
    (l3d_io.os, "replace", _failing_replace()),  # the factors' replace, after the JSON's
], ids=["json-write", "factors-write", "factors-replace"])
def test_a_failed_save_leaves_the_earlier_save_and_other_files_as_they_were(decs, tmp_path, monkeypatch,
                                                                               target, attr, fake):
    model, dec_a, dec_b = decs
    folder = tmp_path / "d"
    dec_a.save(folder)
    (folder / "notes.txt").write_text("the user's own file")
    before = snapshot(folder)
    with monkeypatch.context() as m:
        m.setattr(target, attr, fake)
        with pytest.raises(OSError, match="simulated"):
            dec_b.save(folder)
    assert snapshot(folder) == before  # no temporary file left, nothing replaced
    assert_same(Decomposition.load(folder, model), dec_a)


def test_a_save_writes_only_its_two_files_and_loads_back(decs, tmp_path):
    model, dec_a, dec_b = decs
    folder = tmp_path / "d"
    dec_a.save(folder)
    dec_b.save(folder)  # over an earlier save
    assert sorted(os.listdir(folder)) == ["decomposition.json", "factors.safetensors"]
    meta = json.loads((folder / "decomposition.json").read_text())
    assert isinstance(meta["factors_sha256"], str) and isinstance(meta["fingerprint"]["others"], str)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(Decomposition.load(folder, model), dec_b)


@pytest.mark.parametrize("moved", ["decomposition.json", "factors.safetensors"])
def test_the_files_of_two_saves_are_refused_not_loaded_as_a_mix(decs, tmp_path, moved):
    """What a kill between the two replaces leaves: one file of the new save, one of the old."""
    model, dec_a, dec_b = decs
    dec_a.save(tmp_path / "a")
    dec_b.save(tmp_path / "b")
    shutil.copy(tmp_path / "b" / moved, tmp_path / "a" / moved)
    with pytest.raises(ValueError, match=r"factors\.safetensors does not hold the factors .*decomposition\.json "
                                         r"was saved with .*different saves"):
        Decomposition.load(tmp_path / "a", model)


def test_a_save_without_the_factors_hash_still_loads(decs, tmp_path):
    model, dec_a, _ = decs
    folder = edited(tmp_path, dec_a, meta=lambda m: m.pop("factors_sha256"))
    assert_same(Decomposition.load(folder, model), dec_a)


# --- 2. check_weights covers the model's other parameters -----------------------------------------

def test_check_weights_refuses_a_model_whose_other_parameters_differ(decs, tmp_path):
    model, dec_a, _ = decs
    dec_a.save(tmp_path / "d")
    other = TinyMLP(dtype=torch.float32)
    with torch.no_grad():
        other.scale.mul_(0.5)  # not decomposed (fc1, fc2 are), but it shapes every gradient
    with pytest.raises(ValueError, match=r"parameters outside the decomposed weights differ.*check_weights=False"):
        Decomposition.load(tmp_path / "d", other)
    loaded = Decomposition.load(tmp_path / "d", other, check_weights=False)
    assert all(torch.equal(loaded.factors[k], dec_a.factors[k]) for k in dec_a.factors)


def test_a_save_without_the_other_parameters_fingerprint_loads_with_a_warning(decs, tmp_path):
    model, dec_a, _ = decs
    folder = edited(tmp_path, dec_a, meta=lambda m: [m["fingerprint"].pop(k) for k in ("others", "others_tl")])
    with pytest.warns(UserWarning, match="did not fingerprint the model's other parameters") as record:
        assert_same(Decomposition.load(folder, model), dec_a)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Decomposition.load(folder, model, check_weights=False)


# --- 3. the device the factors load on ------------------------------------------------------------

def _device(value):
    return lambda m: m["config"].__setitem__("device", value)


def test_a_saved_device_this_machine_lacks_loads_on_the_models_with_a_warning(decs, tmp_path):
    model, dec_a, _ = decs
    folder = edited(tmp_path, dec_a, meta=_device("cuda:99"))  # no machine has 100 GPUs
    with pytest.warns(UserWarning, match=r"computed on device 'cuda:99', but .*model's device .*device=") as record:
        loaded = Decomposition.load(folder, model)
    assert record[0].filename == __file__
    assert loaded.cfg.device is None and all(t.device.type == "cpu" for t in loaded.factors.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = Decomposition.load(folder, model, device="cpu")
    assert chosen.cfg.device == "cpu" and all(t.device.type == "cpu" for t in chosen.factors.values())
    assert torch.equal(chosen.coefficients(DATA), dec_a.coefficients(DATA))


@pytest.mark.parametrize("device, error, match", [
    ("banana", ValueError, r"device='banana' is not a device torch knows.*'cpu', 'cuda'"),
    ("cuda:99", ValueError, r"device='cuda:99': "),
    ("meta", ValueError, r"device='meta': the meta device holds no values"),
    (5, TypeError, r"device= must be a string or torch\.device"),
])
def test_a_bad_device_argument_is_a_clear_error(decs, tmp_path, device, error, match):
    model, dec_a, _ = decs
    dec_a.save(tmp_path / "d")
    with pytest.raises(error, match=match):
        Decomposition.load(tmp_path / "d", model, device=device)


def test_an_invalid_saved_device_is_named(decs, tmp_path):
    model, dec_a, _ = decs
    folder = edited(tmp_path, dec_a, meta=_device(3))
    with pytest.raises(ValueError, match=r"decomposition\.json, 'config': device must be None \(the model's "
                                         r"device\) or a string"):
        Decomposition.load(folder, model)


@pytest.mark.parametrize("given", [None, "cpu"])
def test_a_saved_device_this_torch_cannot_name_loads_on_the_model_or_given_device(decs, tmp_path, given):
    """'npu:0' (a torch extension's device) could not be loaded anywhere, even with device='cpu':
    it now loads as a device this machine lacks does, with a warning."""
    model, dec_a, _ = decs
    folder = edited(tmp_path, dec_a, meta=_device("npu:0"))
    with pytest.warns(UserWarning, match=r"computed on device 'npu:0', which this torch does not know"):
        loaded = Decomposition.load(folder, model, device=given)
    assert all(t.device.type == "cpu" for t in loaded.factors.values())
    assert torch.equal(loaded.coefficients(DATA), dec_a.coefficients(DATA))


def test_a_saved_non_bool_include_biases_loads_as_the_run_counted_it(tmp_path):
    """An earlier CLI stored --set include_biases=False as the string 'False', which counted as
    true: the run decomposed the biases. Such a save loads as it was computed, with a warning
    (L3DConfig itself now takes a bool only)."""
    from .helpers import TinyMLP

    model = TinyMLP()
    x = torch.rand(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = L3DConfig(components="fc1", n_subnetworks=2, rank=1, epochs=1, include_biases=True)
    dec = decompose(model, x, cfg, progress=False)
    dec.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "decomposition.json").read_text())
    meta["config"]["include_biases"] = "False"
    (tmp_path / "d" / "decomposition.json").write_text(json.dumps(meta))
    as_earlier_save(tmp_path / "d")
    with pytest.warns(UserWarning, match=r"include_biases is 'False', which the l3d_lens that saved it counted as True"):
        loaded = Decomposition.load(tmp_path / "d", model)
    assert loaded.cfg.include_biases is True and loaded.weight_names == dec.weight_names


# --- 4. history entries ---------------------------------------------------------------------------

def _last(k, v):
    return lambda m: m["history"][-1].__setitem__(k, v)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.__setitem__("history", [1, 2]), r"'history'\[0\] must be a dict"),
    (_last("p_act", [0.5, 0.5]), r"'history'\[0\]\['p_act'\] must be a list of 3 fractions in \[0, 1\]"),
    (_last("p_act", [float("nan")] * 3), r"'history'\[0\]\['p_act'\] must be a list of 3 fractions"),
    (_last("p_act", ["a"] * 3), r"'history'\[0\]\['p_act'\] must be a list of 3 fractions"),
    (_last("loss", "x"), r"'history'\[0\]\['loss'\] must be a number, got 'x'"),
    (_last("n_dead", 7), r"'history'\[0\]\['n_dead'\] must be an int in 0\.\.3"),
    (_last("epoch", True), r"'history'\[0\]\['epoch'\] must be an int >= 0"),
    (lambda m: m["history"][-1].pop("loss"), r"'history'\[0\] lacks the keys \['loss'\]"),
])
def test_a_bad_history_entry_is_named(decs, tmp_path, edit, match):
    model, dec_a, _ = decs
    folder = edited(tmp_path, dec_a, meta=edit)
    with pytest.raises(ValueError, match=r"decomposition\.json: " + match):
        Decomposition.load(folder, model)


def test_an_earlier_versions_history_entry_loads(decs, tmp_path):
    model, dec_a, _ = decs
    folder = edited(tmp_path, dec_a, meta=lambda m: [h.pop(k) for h in m["history"] for k in ("steps", "n_resampled")])
    loaded = Decomposition.load(folder, model)
    assert torch.equal(loaded.fraction_active, dec_a.fraction_active) and "loss=" in repr(loaded)


# --- 5. factor dtypes -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_factors_in_another_dtype_than_the_configs_are_refused(decs, tmp_path, dtype):
    model, dec_a, _ = decs
    folder = edited(tmp_path, dec_a, tensors=lambda f: {k: v.to(dtype) for k, v in f.items()})
    with pytest.raises(ValueError, match=rf"has dtype {dtype}, but the config's dtype is torch\.float32"):
        Decomposition.load(folder, model)


# --- 6. divergence= -------------------------------------------------------------------------------

def my_divergence(out, ref):
    return (out - ref).pow(2).sum(-1)


def other_divergence(out, ref):
    return (out - ref).abs().sum(-1)


def test_divergence_must_be_the_saved_callable_and_only_for_a_custom_save(decs, tmp_path):
    model, dec_a, _ = decs
    custom = decompose(model, DATA, CFG.replace(divergence=my_divergence), progress=False)
    custom.save(tmp_path / "custom")
    with pytest.raises(ValueError, match="custom divergence my_divergence, but divergence= is other_divergence"):
        Decomposition.load(tmp_path / "custom", model, divergence=other_divergence)
    with pytest.raises(ValueError, match=r"divergence= must be the callable this decomposition used"):
        Decomposition.load(tmp_path / "custom", model, divergence="kl")
    assert Decomposition.load(tmp_path / "custom", model, divergence=my_divergence).cfg.divergence is my_divergence
    dec_a.save(tmp_path / "builtin")
    with pytest.raises(ValueError, match=r"built-in divergence 'mse'.*leave it out"):
        Decomposition.load(tmp_path / "builtin", model, divergence=my_divergence)


# --- 7. the format version ------------------------------------------------------------------------

@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_the_format_version_must_be_the_int(decs, tmp_path, version):
    model, dec_a, _ = decs
    folder = edited(tmp_path, dec_a, meta=lambda m: m.__setitem__("format_version", version))
    with pytest.raises(ValueError, match=r"decomposition\.json: format version .*this l3d_lens reads 1 \(an int\)"):
        Decomposition.load(folder, model)


@pytest.mark.parametrize("key, value, match", [
    ("adapter", "hooked", r"'adapter' is 'hooked'; a save writes one of \('hooked_transformer'"),
    ("versions", {"l3d_lens": 0.1}, r"'versions' must map package names to version strings"),
])
def test_tampered_adapter_and_versions_fields_are_named(decs, tmp_path, key, value, match):
    """A hand-edited 'adapter' or 'versions' loaded without a word (only their JSON types were
    checked); they are now what a save writes."""
    model, dec_a, _ = decs
    folder = edited(tmp_path, dec_a, meta=lambda m: m.__setitem__(key, value))
    with pytest.raises(ValueError, match=r"decomposition\.json: " + match):
        Decomposition.load(folder, model)
