"""Saving a trained ``Toy`` and loading it back, so a notebook need not retrain (an x^2 model
takes about a minute): safetensors for the weights, data and ground-truth tensors, JSON for the
rest. Loading checks the format version, the toy's name and every tensor's shape; the input
distribution ``inputs`` is rebuilt from the saved seed (a ``Toy`` made by hand, without one,
loads with ``inputs=None``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load_file, save_file

from ..io import versions
from .train import TOY_NAMES, Toy, _task

FORMAT_VERSION = 1
TENSORS = "toy.safetensors"
META = "toy.json"
PathLike = Union[str, "os.PathLike[str]"]


def save_toy(toy: Toy, path: PathLike) -> Path:
    """Write ``toy`` to the folder ``path`` (created if needed) and return it; the JSON is
    written last, atomically, so a folder with it holds a complete toy."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in toy.model.state_dict().items()}
    tensors.update({"l3d_data": toy.l3d_data, "eval_data": toy.eval_data})
    truth: dict[str, Any] = {}
    for k, v in toy.truth.items():
        if isinstance(v, torch.Tensor):
            tensors[f"truth.{k}"] = v
        else:
            truth[k] = v
    meta = {"format_version": FORMAT_VERSION, "name": toy.name, "seed": toy.seed, "blocks": toy.blocks,
            "train_losses": toy.train_losses, "truth": truth, "model_class": type(toy.model).__name__,
            "versions": versions()}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / TENSORS),
              metadata={"format_version": str(FORMAT_VERSION)})
    tmp = path / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path / META)
    return path


def load_toy(path: PathLike) -> Toy:
    """The ``Toy`` that ``save_toy`` wrote to ``path``: its model (rebuilt as ``make_toy`` builds
    it, then loaded strictly), data, ground truth, training losses and seed."""
    path = Path(path)
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"{path} is not a saved toy (needs {META} and {TENSORS})")
    meta = json.loads((path / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: toy format version {meta.get('format_version')!r}; this l3d_lens reads "
                         f"{FORMAT_VERSION}")
    name, seed = meta["name"], meta["seed"]
    if name not in TOY_NAMES:
        raise ValueError(f"{path}: unknown toy model {name!r}; this l3d_lens has {TOY_NAMES}")
    build, inputs, _, _ = _task(name, 0 if seed is None else seed)
    model = build(0 if seed is None else seed)
    if type(model).__name__ != meta["model_class"]:
        raise ValueError(f"{path}: the saved model is a {meta['model_class']}, but {name!r} builds a "
                         f"{type(model).__name__}")
    tensors = load_file(str(path / TENSORS))
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    if state.keys() != expected.keys():
        raise ValueError(f"{path}: saved weights {sorted(state)}, but {name!r} has {sorted(expected)}")
    wrong = {k: (tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape}
    if wrong:
        raise ValueError(f"{path}: weight shapes differ from {name!r}'s (saved, expected): {wrong}")
    model.load_state_dict(state)
    truth = {**meta["truth"], **{k[len("truth."):]: v for k, v in tensors.items() if k.startswith("truth.")}}
    d_in = next(p for p in model.parameters() if p.dim() == 2).shape[1]
    for key in ("l3d_data", "eval_data"):
        if tensors[key].dim() != 2 or tensors[key].shape[1] != d_in:
            raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}; the model takes [n, {d_in}]")
    return Toy(name, model.eval(), list(meta["train_losses"]), tensors["l3d_data"], tensors["eval_data"],
               inputs if seed is not None else None, truth, blocks=meta["blocks"], seed=seed)
