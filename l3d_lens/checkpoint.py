"""Atomic training checkpoints: factors, Adam state, LR schedule, RNG state, the epoch's data
order and position, history and running sums; safetensors + JSON, never pickles.

Each checkpoint is written to a fresh ``step-<n>/`` folder, then ``latest.json`` is replaced
atomically to point at it, then older folders are removed: a process killed at any moment
leaves the previous checkpoint readable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest.json"
VERSION = 1


def save(path: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    folder = path / f"step-{state['step']}"
    tmp = path / f".tmp-step-{state['step']}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"version": VERSION, **state}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    pointer = path / f".{LATEST}.tmp"
    pointer.write_text(json.dumps({"folder": folder.name, "step": state["step"]}))
    os.replace(pointer, path / LATEST)
    for old in path.glob("step-*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)


def load(path: Path) -> Optional[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """The latest checkpoint in ``path``, or None if there is none."""
    pointer = path / LATEST
    if not pointer.is_file():
        return None
    folder = path / json.loads(pointer.read_text())["folder"]
    state = json.loads((folder / "state.json").read_text())
    if state.get("version") != VERSION:
        raise ValueError(f"{folder}: checkpoint version {state.get('version')!r}; this l3d_lens reads {VERSION}")
    return state, load_file(str(folder / "tensors.safetensors"))


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {f"adam/{i}/{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"], "state_keys": {str(i): list(st) for i, st in sd["state"].items()}}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state = {int(i): {k: tensors[f"adam/{i}/{k}"] for k in keys} for i, keys in meta["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
