"""Saving and loading decompositions: safetensors for the factors, JSON for the rest
(config, history, library and TransformerLens versions, a fingerprint of the decomposed
weights). Loading checks the format version, the model's shapes and, by default, values."""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import L3DConfig
from .subnetworks import key, resolve_ranks

FORMAT_VERSION = 1
FACTORS = "factors.safetensors"
META = "decomposition.json"


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
    meta = json.loads((path / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {meta.get('format_version')!r}; this l3d_lens reads {FORMAT_VERSION}")
    cfg = L3DConfig.from_dict(meta["config"], divergence=divergence)
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
    factors = load_file(str(path / FACTORS))
    dtype = cfg.torch_dtype
    device = torch.device(cfg.device) if cfg.device else task.adapter.device
    factors = {k: v.to(device=device, dtype=dtype) for k, v in factors.items()}
    ranks = resolve_ranks(task.selected, cfg.rank)
    for s in task.selected:
        for side in ("in", "out"):
            core = factors.get(key(side, s.name, "core"))
            if core is None or tuple(core.shape) != (cfg.n_subnetworks, *ranks[s.name]):
                raise ValueError(f"{path}: factors of {s.name} are missing or mis-shaped")
    return Decomposition(task, factors, meta["history"])
