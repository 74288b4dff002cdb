"""Saving a trained ``Toy`` and loading it back, so a notebook need not retrain (an x^2 model
takes about a minute): safetensors for the weights, data and ground-truth tensors, JSON for the
rest. Loading checks the JSON before it reads a tensor (format version, then the type and range
of every field: the toy's name, seed, ...), then every weight's shape and that the two files
belong together: the JSON holds the tensors file's sha256, and the tensors file's header the JSON
fields that make the toy (``TOY_FIELDS``), so a JSON edited after saving (a seed, a truth) is
refused; and that the tensors are those the toy's name implies (``_check_tensors``: no more, no
fewer, in their shapes, floating point and finite). The toy comes back on the CPU in the dtype it
was saved in, and its input distribution ``inputs`` is rebuilt from the saved seed (a ``Toy``
made by hand, without one, loads with ``inputs=None``). Only a model of the architecture
``make_toy`` builds for the toy's name can be saved. A save writes both files under temporary
names before it moves them over an older toy's, and puts the older JSON back if the second move
fails (``save_toy``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from torch import nn

from ..io import read_json_object, versions, write_pair, write_safetensors
from .train import MAX_SAVED_SEED, Toy, _check_int, _task, check_toy_name

FORMAT_VERSION = 1
TENSORS = "toy.safetensors"
META = "toy.json"
#: the JSON fields that make the toy; the tensors file's header holds a copy (key "toy")
TOY_FIELDS = ("name", "seed", "blocks", "train_losses", "truth", "model_class")
PathLike = Union[str, "os.PathLike[str]"]


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _toy_json(meta: dict[str, Any]) -> str:
    """``meta``'s ``TOY_FIELDS`` as one canonical JSON string (what the tensors file's header holds)."""
    return json.dumps({k: meta[k] for k in TOY_FIELDS}, sort_keys=True)


def _checked(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """``meta`` with its ``TOY_FIELDS`` checked (seed and blocks as ints); ValueError starting
    with ``where``, naming the field and what it must be, otherwise. Save checks what it is
    about to write and load what it read, so a toy that saves loads back."""
    try:
        check_toy_name(meta["name"])
        seed = None if meta["seed"] is None else _check_int(
            "seed", meta["seed"], 0, "make_toy's seed; null for a toy made by hand", MAX_SAVED_SEED)
        blocks = _check_int("blocks", meta["blocks"], 1, "blocks of starts trained")
        losses = meta["train_losses"]
        if not isinstance(losses, list):
            raise ValueError(f"train_losses must be a list of floats (the loss of every epoch), got "
                             f"{reprlib.repr(losses)}")
        for i, v in enumerate(losses):
            if not isinstance(v, float):
                raise ValueError(f"train_losses[{i}] must be a float (NaN and Infinity allowed), got {reprlib.repr(v)}")
        for key, kind, what in (("truth", dict, "an object (the ground truth that is not a tensor)"),
                                ("model_class", str, "a string (the model's class name)")):
            if not isinstance(meta[key], kind):
                raise ValueError(f"{key} must be {what}, got {reprlib.repr(meta[key])}")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return {**meta, "seed": seed, "blocks": blocks}


def _read_meta(path: Path) -> dict[str, Any]:
    """The JSON of the toy saved in ``path``, checked before any tensor is read: an object of
    this format version with every key ``save_toy`` writes, each of the right type and range;
    ValueError naming the file and the field otherwise."""
    file = path / META
    meta = read_json_object(file, "save_toy")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(f"{file}: toy format version {version!r}; this l3d_lens reads {FORMAT_VERSION}")
    missing = [k for k in (*TOY_FIELDS, "sha256", "saved_from", "versions") if k not in meta]
    if missing:
        raise ValueError(f"{file} lacks the keys {missing}, which save_toy always writes")
    if not isinstance(meta["sha256"], str) or not re.fullmatch("[0-9a-f]{64}", meta["sha256"]):
        raise ValueError(f"{file}: sha256 must be 64 hex digits (the sha256 of {TENSORS}), got "
                         f"{reprlib.repr(meta['sha256'])}")
    for key in ("saved_from", "versions"):
        if not isinstance(meta[key], dict):
            raise ValueError(f"{file}: {key} must be an object, got {reprlib.repr(meta[key])}")
    return _checked(meta, str(file))


def _check_not_edited(path: Path, meta: dict[str, Any], header: Optional[str]) -> None:
    """ValueError unless the JSON's ``TOY_FIELDS`` are those the tensors file's header was saved
    with (``header``, its "toy" entry; the JSON's sha256 covers it): an edited seed would silently
    change the rebuilt ``inputs``, an edited truth the metrics. A header without them (a toy
    saved before they were recorded there) is not compared."""
    if header is None:
        return
    try:
        saved = json.loads(header)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path / TENSORS}: its header's 'toy' entry is not JSON ({type(e).__name__}); the file "
                         f"was not written by save_toy") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path / TENSORS}: its header's 'toy' entry is a JSON {type(saved).__name__}, not the "
                         f"object save_toy writes")
    edited = {k: saved.get(k) for k in TOY_FIELDS
              if json.dumps(saved.get(k), sort_keys=True) != json.dumps(meta[k], sort_keys=True)}
    if edited:
        raise ValueError(f"{path / META} was edited after saving: {TENSORS} was saved with "
                         f"{', '.join(f'{k}={reprlib.repr(v)}' for k, v in edited.items())}, the JSON says "
                         f"{', '.join(f'{k}={reprlib.repr(meta[k])}' for k in edited)}")


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


def _d_in(model: nn.Module) -> int:
    """The input width of a toy model: that of its first matrix."""
    return next(p for p in model.parameters() if p.dim() == 2).shape[1]


def _check_tensors(name: str, seed: Optional[int], tensors: dict[str, torch.Tensor], d_in: int, where: str) -> None:
    """ValueError starting with ``where`` unless ``tensors`` (keyed as in the tensors file) are
    what a toy ``name`` holds besides its weights' names and shapes (``_built_like`` checks those):
    ``l3d_data`` and ``eval_data`` [n, d_in] (a toy made by hand may have no rows), the truth's
    tensors (exactly those ``make_toy`` gives a toy with a seed; a toy made by hand, without one,
    may hold others of any dtype and values), the toy's own truth tensors (TMCS's ``A``) in their
    shape, every other tensor floating point, and all but a hand-made toy's other truth finite.
    Save checks what it is about to write and load what it read, so a toy that saves loads back."""
    own = {f"truth.{k}": v for k, v in _task(name, 0 if seed is None else seed)[3].items()
           if isinstance(v, torch.Tensor)}
    rest = {k for k in tensors if not k.startswith("model.")}
    required = {"l3d_data", "eval_data", *(own if seed is not None else ())}
    missing = sorted(required - rest)
    unknown = sorted(k for k in rest - required if seed is not None or not k.startswith("truth."))
    if missing or unknown:
        expected = sorted({*required, *own})
        raise ValueError(f"{where}: tensors {expected} (besides the model's) expected for {name!r}"
                         f"{'' if seed is not None else ' made by hand'}; "
                         + "; ".join(f"{what} {keys}" for what, keys in (("missing", missing), ("unknown", unknown))
                                     if keys))
    for key, value in tensors.items():
        if not value.dtype.is_floating_point and (key in own or not key.startswith("truth.")):
            raise ValueError(f"{where}: {key} is {value.dtype}; a toy's tensors are floating point")
        if key in ("l3d_data", "eval_data") and (value.dim() != 2 or value.shape[1] != d_in
                                                 or (seed is not None and value.shape[0] < 1)):
            rows = "n >= 1" if seed is not None else "n >= 0"
            raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}; the model takes [n, {d_in}] with {rows}")
        if key in own and value.shape != own[key].shape:
            raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}; {name!r} needs {tuple(own[key].shape)}")
        users = key.startswith("truth.") and key not in own and seed is None  # a hand-made toy's own truth
        if not users and value.dtype.is_floating_point and not torch.isfinite(value).all():
            raise ValueError(f"{where}: {key} holds NaN or infinite values")


def save_toy(toy: Toy, path: PathLike) -> Path:
    """Write ``toy`` to the folder ``path`` (created if needed) and return it. Everything is
    checked before a file is touched (the JSON fields and the tensors as ``load_toy`` checks
    them). Both files are written under temporary names first, then moved over an older toy's,
    the JSON first: if the tensors' move fails (an OSError, a KeyboardInterrupt), the older
    JSON's bytes go back, so a save that fails leaves the older toy as it was. One killed
    between the two moves leaves the new JSON with the old tensors, which loading refuses (the
    JSON's sha256 is that of its own tensors file), never a mix. Other files in the folder are
    left alone."""
    truth: dict[str, Any] = {k: v for k, v in toy.truth.items() if not isinstance(v, torch.Tensor)}
    meta = _checked({"name": toy.name, "seed": toy.seed, "blocks": toy.blocks,
                     "train_losses": [float(v) for v in toy.train_losses], "truth": truth,
                     "model_class": type(toy.model).__name__}, "cannot save this toy")
    built = _built_like(toy.name, meta["seed"], meta["model_class"], toy.model.state_dict(), "cannot save this toy")
    try:
        same = json.loads(json.dumps(truth)) == truth
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ValueError(f"cannot save this toy: its non-tensor truth {truth!r} does not survive JSON "
                         "(use str keys and int, float, str, bool or list values)")
    meta = {"format_version": FORMAT_VERSION, **meta,
            "saved_from": {"device": str(next(toy.model.parameters()).device)}, "versions": versions()}
    tensors = {f"model.{k}": v for k, v in toy.model.state_dict().items()}
    tensors.update({"l3d_data": toy.l3d_data, "eval_data": toy.eval_data})
    tensors.update({f"truth.{k}": v for k, v in toy.truth.items() if isinstance(v, torch.Tensor)})
    _check_tensors(toy.name, meta["seed"], tensors, _d_in(built), "cannot save this toy")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}

    def meta_text(tmp: Path) -> str:
        meta["sha256"] = _sha256(tmp)
        return json.dumps(meta, indent=1)

    write_pair(path, TENSORS, lambda tmp: write_safetensors(cpu, tmp, {"format_version": str(FORMAT_VERSION),
                                                                      "toy": _toy_json(meta)}), META, meta_text)
    return path


def load_toy(path: PathLike) -> Toy:
    """The ``Toy`` that ``save_toy`` wrote to ``path``: its model (built as ``make_toy`` builds
    it, in the saved dtype, then loaded strictly), data, ground truth, training losses and seed.
    ValueError naming the folder and what is wrong for a JSON or tensors file that is not one."""
    path = Path(path)
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"{path} is not a saved toy (needs {META} and {TENSORS})")
    meta = _read_meta(path)
    if _sha256(path / TENSORS) != meta["sha256"]:
        raise ValueError(f"{path}: {TENSORS} is not the file {META} was saved with (its sha256 differs)")
    name, seed = meta["name"], meta["seed"]
    with safe_open(str(path / TENSORS), "pt") as f:  # the tensors and the header's copy, in one open
        header = (f.metadata() or {}).get("toy")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model = _built_like(name, seed, meta["model_class"], state, f"{path}: the saved toy does not fit")
    _check_not_edited(path, meta, header)
    _check_tensors(name, seed, tensors, _d_in(model), str(path))
    dtypes = {v.dtype for v in state.values()}
    if len(dtypes) != 1:
        raise ValueError(f"{path}: the saved weights mix dtypes {sorted(map(str, dtypes))}")
    model = model.to(dtypes.pop())
    model.load_state_dict(state)
    truth = {**meta["truth"], **{k[len("truth."):]: v for k, v in tensors.items() if k.startswith("truth.")}}
    inputs = None if seed is None else _task(name, seed)[1]
    return Toy(name, model.eval(), meta["train_losses"], tensors["l3d_data"], tensors["eval_data"],
               inputs, truth, blocks=meta["blocks"], seed=seed)
