"""Atomic training checkpoints: factors, Adam state, LR schedule, RNG state, the epoch's data
order and position, history and running sums; safetensors + JSON, never pickles.

Each checkpoint is written to a hidden ``.tmp-step-<n>-<pid>-<random>/`` folder, renamed to a folder no
checkpoint uses yet (``step-<n>/``, or ``step-<n>-<i>/`` when step n was saved before, as an epoch
end does after a save on its last batch), then ``latest.json`` is replaced atomically to point
at it, then older folders and leftovers of killed saves are removed: no folder latest.json names
is touched before latest.json names another, so a process killed at any moment leaves the
previous checkpoint readable.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest.json"
VERSION = 1


def save(path: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    step = state["step"]
    # a name no earlier save used: a recovered leftover of a killed save (``load``) may hold this
    # step, and the same process id comes back in containers
    tmp = path / f".tmp-step-{step}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"version": VERSION, **state}))
    # never over an existing folder: the one latest.json names may have this step's name
    name, i = f"step-{step}", 0
    while (path / name).exists():
        i += 1
        name = f"step-{step}-{i}"
    os.replace(tmp, path / name)
    pointer = path / f".{LATEST}.tmp"
    pointer.write_text(json.dumps({"folder": name, "step": step}))
    os.replace(pointer, path / LATEST)
    for old in [*path.glob("step-*"), *path.glob(".tmp-step-*")]:  # older checkpoints, leftovers of killed saves
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def load(path: Path) -> Optional[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """The latest checkpoint in ``path``, or None if there is none. Folders of unfinished saves
    (``.tmp-*``) are ignored, except that if latest.json names a missing folder (what an
    earlier l3d_lens left when killed while saving a step a second time), the complete save
    of that step waiting in its ``.tmp-step-<n>-<pid>`` folder is read."""
    pointer = path / LATEST
    if not pointer.is_file():
        return None
    latest = json.loads(pointer.read_text())
    folder = path / latest["folder"]
    if not (folder / "state.json").is_file():
        folder = _unmoved_save(path, latest.get("step"))
        if folder is None:
            raise FileNotFoundError(
                f"{path}: {LATEST} names {latest['folder']}, which is missing or incomplete, and no complete save of "
                f"step {latest.get('step')} is left beside it; this checkpoint cannot be resumed: remove the folder "
                f"or use a fresh checkpoint folder")
    state = json.loads((folder / "state.json").read_text())
    if state.get("version") != VERSION:
        raise ValueError(f"{folder}: checkpoint version {state.get('version')!r}; this l3d_lens reads {VERSION}")
    return state, load_file(str(folder / "tensors.safetensors"))


def _unmoved_save(path: Path, step: Any) -> Optional[Path]:
    """A ``.tmp-step-<step>-<pid>`` folder holding a complete save of ``step``: its state.json is
    written after its tensors, so a readable one with that step is complete."""
    if not isinstance(step, int):
        return None
    for tmp in sorted(path.glob(f".tmp-step-{step}-*")):
        try:
            state = json.loads((tmp / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("step") == step and (tmp / "tensors.safetensors").is_file():
            return tmp
    return None


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {f"adam/{i}/{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"], "state_keys": {str(i): list(st) for i, st in sd["state"].items()}}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state = {int(i): {k: tensors[f"adam/{i}/{k}"] for k in keys} for i, keys in meta["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
