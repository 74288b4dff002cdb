"""Saving a trained ``Toy`` and loading it back, so a notebook need not retrain (an x^2 model
takes about a minute): safetensors for the weights, data and ground-truth tensors, JSON for the
rest. Loading checks the format version, the toy's name, every weight's shape and that the two
files belong together (the JSON holds the tensors file's sha256); the toy comes back on the CPU
in the dtype it was saved in, and its input distribution ``inputs`` is rebuilt from the saved
seed (a ``Toy`` made by hand, without one, loads with ``inputs=None``). Only a model of the
architecture ``make_toy`` builds for the toy's name can be saved.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import versions
from .train import Toy, _task, check_toy_name

FORMAT_VERSION = 1
TENSORS = "toy.safetensors"
META = "toy.json"
PathLike = Union[str, "os.PathLike[str]"]


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _built_like(name: str, seed, model_class: str, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """The model ``make_toy`` builds for ``name`` (from ``seed``, or 0 for a toy without one),
    after checking that a model of class ``model_class`` with weights ``state`` fits it: same
    class, weight names and shapes; ValueError starting with ``where`` otherwise."""
    built = _task(name, 0 if seed is None else seed)[0](0 if seed is None else seed)
    if model_class != type(built).__name__:
        raise ValueError(f"{where}: the model is a {model_class}, but {name!r} builds a {type(built).__name__}")
    theirs = built.state_dict()
    if state.keys() != theirs.keys():
        raise ValueError(f"{where}: weights {sorted(state)}, but {name!r} has {sorted(theirs)}")
    wrong = {k: (tuple(v.shape), tuple(theirs[k].shape)) for k, v in state.items() if v.shape != theirs[k].shape}
    if wrong:
        raise ValueError(f"{where}: weight shapes differ from {name!r}'s (these, {name!r}'s): {wrong}")
    return built


def save_toy(toy: Toy, path: PathLike) -> Path:
    """Write ``toy`` to the folder ``path`` (created if needed) and return it. Everything is
    checked before a file is touched; an older toy there is replaced (its JSON removed first,
    the new JSON written last), so a folder either loads as the new toy or is refused."""
    check_toy_name(toy.name)
    _built_like(toy.name, toy.seed, type(toy.model).__name__, toy.model.state_dict(), "cannot save this toy")
    truth: dict[str, Any] = {k: v for k, v in toy.truth.items() if not isinstance(v, torch.Tensor)}
    try:
        same = json.loads(json.dumps(truth)) == truth
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ValueError(f"cannot save this toy: its non-tensor truth {truth!r} does not survive JSON "
                         "(use str keys and int, float, str, bool or list values)")
    meta = {"format_version": FORMAT_VERSION, "name": toy.name, "seed": None if toy.seed is None else int(toy.seed),
            "blocks": int(toy.blocks), "train_losses": [float(v) for v in toy.train_losses], "truth": truth,
            "model_class": type(toy.model).__name__,
            "saved_from": {"device": str(next(toy.model.parameters()).device)}, "versions": versions()}
    tensors = {f"model.{k}": v for k, v in toy.model.state_dict().items()}
    tensors.update({"l3d_data": toy.l3d_data, "eval_data": toy.eval_data})
    tensors.update({f"truth.{k}": v for k, v in toy.truth.items() if isinstance(v, torch.Tensor)})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / META).unlink(missing_ok=True)
    tmp = path / (TENSORS + ".tmp")
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format_version": str(FORMAT_VERSION)})
    meta["sha256"] = _sha256(tmp)
    os.replace(tmp, path / TENSORS)
    tmp = path / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path / META)
    return path


def load_toy(path: PathLike) -> Toy:
    """The ``Toy`` that ``save_toy`` wrote to ``path``: its model (built as ``make_toy`` builds
    it, in the saved dtype, then loaded strictly), data, ground truth, training losses and seed."""
    path = Path(path)
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"{path} is not a saved toy (needs {META} and {TENSORS})")
    meta = json.loads((path / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: toy format version {meta.get('format_version')!r}; this l3d_lens reads "
                         f"{FORMAT_VERSION}")
    if _sha256(path / TENSORS) != meta.get("sha256"):
        raise ValueError(f"{path}: {TENSORS} is not the file {META} was saved with (its sha256 differs)")
    name, seed = meta["name"], meta["seed"]
    try:
        check_toy_name(name)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    tensors = load_file(str(path / TENSORS))
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model = _built_like(name, seed, meta["model_class"], state, f"{path}: the saved toy does not fit")
    dtypes = {v.dtype for v in state.values()}
    if len(dtypes) != 1:
        raise ValueError(f"{path}: the saved weights mix dtypes {sorted(map(str, dtypes))}")
    model = model.to(dtypes.pop())
    model.load_state_dict(state)
    d_in = next(p for p in model.parameters() if p.dim() == 2).shape[1]
    for key in ("l3d_data", "eval_data"):
        if tensors[key].dim() != 2 or tensors[key].shape[1] != d_in:
            raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}; the model takes [n, {d_in}]")
    truth = {**meta["truth"], **{k[len("truth."):]: v for k, v in tensors.items() if k.startswith("truth.")}}
    inputs = None if seed is None else _task(name, seed)[1]
    return Toy(name, model.eval(), list(meta["train_losses"]), tensors["l3d_data"], tensors["eval_data"],
               inputs, truth, blocks=meta["blocks"], seed=seed)
