"""Saving and loading decompositions: safetensors for the factors, JSON for the rest
(config, history, library and TransformerLens versions, a fingerprint of the decomposed
weights). Loading checks the format version, every key and factor the decomposition needs,
the model's shapes and, by default, values; a file from a newer l3d_lens loads with a warning."""

from __future__ import annotations

import json
import os
import re
import reprlib
import warnings
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import L3DConfig
from .subnetworks import SIDES, key, resolve_ranks

FORMAT_VERSION = 1
FACTORS = "factors.safetensors"
META = "decomposition.json"
META_TYPES = {"config": dict, "adapter": str, "weights": list, "fingerprint": dict, "history": list, "versions": dict}


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("l3d_lens", "transformer_lens", "torch"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def save(dec, path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in dec.factors.items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "config": dec.cfg.to_dict(),
        "adapter": dec.adapter.kind,
        "weights": dec.weight_names,
        "fingerprint": dec.adapter.fingerprint(dec.weight_names),
        "history": dec.history,
        "versions": versions(),
    }
    tmp = path / (META + ".tmp")
    save_file(tensors, str(path / FACTORS), metadata={"format_version": str(FORMAT_VERSION)})
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path / META)


def load(path, model: nn.Module, divergence=None, check_weights: bool = True):
    from .decomposition import Decomposition, build_task

    path = Path(path)
    if not (path / META).is_file() or not (path / FACTORS).is_file():
        raise FileNotFoundError(f"{path} is not a saved decomposition (needs {META} and {FACTORS})")
    meta = _read_meta(path / META)
    try:
        cfg = L3DConfig.from_dict(meta["config"], divergence=divergence)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / META}, 'config': {e}") from None
    if cfg.sample == "token" and cfg.position != -1:  # saved before token mode refused it; it was unused
        cfg = cfg.replace(position=-1)
    try:
        task = build_task(model, cfg)
    except ValueError as e:
        raise ValueError(f"the saved decomposition does not fit this model: {e}") from None
    names = [s.name for s in task.selected]
    if names != meta["weights"]:
        raise ValueError(f"the saved decomposition covers {meta['weights']}, but on this model the selection gives {names}")
    fp = task.adapter.fingerprint(names)
    saved = meta["fingerprint"]
    if fp["shapes"] != saved["shapes"]:
        diff = {n: (saved["shapes"].get(n), fp["shapes"].get(n)) for n in names if saved["shapes"].get(n) != fp["shapes"].get(n)}
        raise ValueError(f"weight shapes differ from the saved decomposition's (saved, this model): {diff}")
    if check_weights and fp["sha256"] != saved["sha256"]:
        raise ValueError("this model's weights differ from those the decomposition was computed on "
                         "(pass check_weights=False to load it anyway)")
    device = torch.device(cfg.device) if cfg.device else task.adapter.device
    factors = _read_factors(path / FACTORS, expected_shapes(task.selected, cfg), cfg.torch_dtype, device)
    return Decomposition(task, factors, meta["history"])


def expected_shapes(selected, cfg: L3DConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every factor ``init_factors`` builds for ``cfg``: core [K, *ranks], U<m> [K, I_m, R_m]."""
    ranks = resolve_ranks(selected, cfg.rank)
    out = {}
    for side in SIDES:
        for s in selected:
            r = ranks[s.name]
            out[key(side, s.name, "core")] = (cfg.n_subnetworks, *r)
            for m, (dim, rm) in enumerate(zip(s.shape, r)):
                out[key(side, s.name, f"U{m}")] = (cfg.n_subnetworks, dim, rm)
    return out


def read_json_object(file: Path, writer: str) -> dict:
    """The JSON object ``writer`` saved in ``file``; ValueError naming the file otherwise."""
    try:
        meta = json.loads(file.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} holds a JSON {type(meta).__name__}, not the object {writer} writes")
    return meta


def _read_meta(file: Path) -> dict:
    """The saved JSON, with every key ``save`` writes, of the right type; ValueError naming the
    file and the key otherwise. Warns if a newer l3d_lens saved it."""
    meta = read_json_object(file, "Decomposition.save")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format version {meta.get('format_version')!r}; this l3d_lens reads {FORMAT_VERSION}")
    missing = [k for k in META_TYPES if k not in meta]
    if missing:
        raise ValueError(f"{file} lacks the keys {missing}, which Decomposition.save always writes")
    for k, kind in META_TYPES.items():
        if not isinstance(meta[k], kind):
            raise ValueError(f"{file}: {k!r} must be a {kind.__name__}, got {reprlib.repr(meta[k])}")
    fp = meta["fingerprint"]
    if not (isinstance(fp.get("shapes"), dict) and isinstance(fp.get("sha256"), str)):
        raise ValueError(f"{file}: 'fingerprint' must be a dict with 'shapes' and 'sha256', got {reprlib.repr(fp)}")
    saved, mine = meta["versions"].get("l3d_lens"), versions()["l3d_lens"]
    if _major_minor(saved) > _major_minor(mine) and _major_minor(mine) > (-1, -1):
        warnings.warn(f"{file} was saved by l3d_lens {saved}, newer than the installed {mine}; "
                      f"upgrade l3d_lens if it does not behave as it did there", stacklevel=4)
    return meta


def _major_minor(version) -> tuple[int, int]:
    """(major, minor) of a version string; (-1, -1) if it has none (e.g. "unknown")."""
    m = re.match(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    return (int(m[1]), int(m[2])) if m else (-1, -1)


def _read_factors(file: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """The saved factors in ``dtype`` on ``device``, after checking that they are exactly those
    of ``shapes``, floating point and finite; ValueError naming the file and tensor otherwise."""
    try:
        saved = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e})") from None
    extra = sorted(set(saved) - set(shapes))
    if extra:
        raise ValueError(f"{file} holds unexpected tensors {extra}, which this decomposition's config does not build")
    out = {}
    for k, shape in shapes.items():
        t = saved.get(k)
        if t is None:
            raise ValueError(f"{file} lacks {k!r}, expected shape {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{file}: {k!r} has dtype {t.dtype}; expected a floating-point dtype")
        if tuple(t.shape) != shape:
            raise ValueError(f"{file}: {k!r} has shape {tuple(t.shape)}; expected {shape}")
        out[k] = t.to(device=device, dtype=dtype)
        if not torch.isfinite(out[k]).all():
            raise ValueError(f"{file}: {k!r} holds NaN or inf (in {dtype}); a trained decomposition's factors are finite")
    return out
