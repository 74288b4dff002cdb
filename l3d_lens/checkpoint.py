"""Atomic training checkpoints: factors, Adam state, LR schedule, RNG state, the epoch's data
order and position, history and running sums; safetensors + JSON, never pickles.

Each checkpoint is written to a hidden ``.tmp-step-<n>-<pid>-<random>/`` folder, renamed to a folder no
checkpoint uses yet (``step-<n>/``, or ``step-<n>-<i>/`` when step n was saved before, as an epoch
end does after a save on its last batch), then ``latest.json`` is replaced atomically to point
at it, then older folders and leftovers of killed saves are removed: no folder latest.json names
is touched before latest.json names another, so a process killed at any moment leaves the
previous checkpoint readable; every file and rename is flushed to the disk (``io.fsync``) before
the next step relies on it, so that a power loss does too. Only folders a save made are
removed: a name of that pattern holding nothing but a save's files, and for ``step-*`` the
marker file every save writes first (a ``step-*`` folder of an l3d_lens that wrote no marker is
left in place). Reading checks the pointer, the state's keys and types and that the tensors file
reads; ``training`` checks the rest against the run before restoring anything. A run holds its
folder's lock (``FolderLock``) while it trains, so that a second run cannot remove its
unfinished saves or overwrite its checkpoints.
"""

from __future__ import annotations

import errno
import json
import os
import re
import reprlib
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .io import fsync, tensor_shapes, write_safetensors

try:
    import fcntl
except ImportError:  # Windows: checkpoint folders are not locked
    fcntl = None

LATEST = "latest.json"
VERSION = 1
#: the rules by which ``data.batches`` gathers an iterable's batches of fewer than min_batch rows,
#: saved in every state; one without it was written by an l3d_lens before rules 2 (a short batch
#: joined the one before), where a position can mean other rows (``training.check_batching``)
BATCHING = 2
STATE, TENSORS = "state.json", "tensors.safetensors"
LOCK = ".l3d_lens-lock"  # "<host> <pid>" of the run that saves into the folder
MARKER = ".l3d_lens-checkpoint"  # written first into every save's folder: the folders a save may remove
STEP_FOLDER = re.compile(r"step-\d+(-\d+)?")
TMP_FOLDER = re.compile(r"\.tmp-step-\d+-\d+(-[0-9a-f]{12})?")  # without the random part: an earlier l3d_lens
NUMBER = (int, float)
STATE_TYPES: dict[str, Any] = {"identity": dict, "step": int, "epoch": int, "batch": int, "history": list,
                               "n_seen": int, "loss_num": NUMBER, "loss_den": NUMBER, "optimizer": dict,
                               "scheduler": dict}
TYPE_WORDS = {dict: "an object", int: "an int", list: "a list", NUMBER: "a number"}


def check_folder(checkpoint: Any) -> None:
    """Before any training: ``checkpoint`` is None or a path that is a folder or can be made one
    (a save would otherwise fail after the first epoch): not a file, nor a symbolic link to nothing."""
    if checkpoint is None:
        return
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a folder path (str or os.PathLike) or None, got "
                        f"{type(checkpoint).__name__}")
    path = Path(checkpoint)
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            raise ValueError(f"checkpoint={str(checkpoint)!r}: {'it' if p == path else f'its parent {p}'} is a "
                             f"symbolic link to {os.readlink(p)}, which does not exist, so no folder can be made "
                             f"there; create its target, remove the link, or pass another folder")
        if p.is_dir():
            return
        if p.exists():
            raise ValueError(f"checkpoint={str(checkpoint)!r}: {'it' if p == path else f'its parent {p}'} is a file, "
                             f"not a folder; a checkpoint is a folder (created if missing) that holds {LATEST} and "
                             f"step-<n>/ folders: pass a folder path")


class FolderLock:
    """A run's exclusive hold on its checkpoint folder (``take``), released on exit: an advisory
    ``fcntl.flock`` on a lock file, which the kernel drops when the process ends, however it ends
    (a killed or preempted run's folder resumes at once, on this host or another). Two runs saving
    into one folder at once would remove each other's unfinished saves and overwrite each other's
    checkpoints, so the second is refused. Where there is no flock (Windows) or the folder cannot
    be written (a finished checkpoint on read-only storage), nothing is locked."""

    def __init__(self) -> None:
        self.fd: Optional[int] = None

    def take(self, path: Path) -> None:
        if fcntl is None:
            return
        file = path / LOCK
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(file, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):  # nothing can be saved here either
                return
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RuntimeError(f"checkpoint folder {path} is in use by {_lock_holder(file)} (it holds {file}); wait "
                               f"for that run to end or pass another checkpoint folder") from None
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # drops the flock

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _lock_holder(file: Path) -> str:
    """Who holds the lock ``file``, in words, from what its holder wrote in it."""
    try:
        host, pid = file.read_text().split()
    except (OSError, ValueError):  # being written this moment
        return "another run"
    return f"process {pid}" + ("" if host == socket.gethostname() else f" on host {host}")


def damaged(path: Path, file: Path, problem: str) -> ValueError:
    """The error for a checkpoint in ``path`` that cannot be resumed, naming the file and what is wrong."""
    return ValueError(f"{file}: {problem}; this checkpoint cannot be resumed: remove the folder {path} or pass "
                      f"another checkpoint folder to start this run afresh")


def is_a(value: Any, kind: Any) -> bool:
    """isinstance, except that a bool is no int or float (JSON true is not a step)."""
    return isinstance(value, kind) and not isinstance(value, bool)


def save(path: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write a checkpoint of ``state`` (with this l3d_lens's ``VERSION`` and ``BATCHING``) and
    ``tensors`` into ``path`` as the module docstring says, each file and rename on the disk
    (``fsync``) before the next step relies on it: a power loss leaves the previous checkpoint
    or this one, never a pointer to empty files with the older folders gone."""
    path.mkdir(parents=True, exist_ok=True)
    step = state["step"]
    # a name no earlier save used: a recovered leftover of a killed save (``load``) may hold this
    # step, and the same process id comes back in containers
    tmp = path / f".tmp-step-{step}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    (tmp / MARKER).write_text("l3d_lens checkpoint: removed by l3d_lens once a newer checkpoint is in place\n")
    write_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp / TENSORS)
    (tmp / STATE).write_text(json.dumps({"version": VERSION, "batching": BATCHING, **state}))
    for written in (tmp / MARKER, tmp / STATE, tmp):
        fsync(written)
    # never over an existing folder: the one latest.json names may have this step's name
    name, i = f"step-{step}", 0
    while (path / name).exists():
        i += 1
        name = f"step-{step}-{i}"
    os.replace(tmp, path / name)
    fsync(path)  # the folder is in place before the pointer names it
    pointer = path / f".{LATEST}.tmp"
    pointer.write_text(json.dumps({"folder": name, "step": step}))
    fsync(pointer)
    os.replace(pointer, path / LATEST)
    fsync(path)  # the pointer names the new folder for good: only now may the older go
    for old in sorted(path.iterdir()):  # older checkpoints, leftovers of killed saves
        if old.name != name and _made_by_save(old):
            shutil.rmtree(old, ignore_errors=True)


def _made_by_save(folder: Path) -> bool:
    """Whether ``folder`` is one a save made, so one a save may remove: a name of the pattern saves
    use, holding no file but those a save writes; a ``step-*`` folder also holds the marker (a
    ``.tmp-step-*`` one may lack it: a save killed before writing it, or one of an earlier l3d_lens)."""
    if not (STEP_FOLDER.fullmatch(folder.name) or TMP_FOLDER.fullmatch(folder.name)):
        return False
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    if any(e.name not in (MARKER, STATE, TENSORS) or e.is_symlink() or not e.is_file() for e in entries):
        return False
    return TMP_FOLDER.fullmatch(folder.name) is not None or (folder / MARKER).is_file()


def load(path: Path) -> Optional[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """The latest checkpoint in ``path`` as (state, tensors), or None if there is none (see ``read``)."""
    found = read(path)
    return None if found is None else found[1:]


def read(path: Path) -> Optional[tuple[Path, dict[str, Any], dict[str, torch.Tensor]]]:
    """The latest checkpoint in ``path`` as (its folder, state, tensors), or None if there is none;
    ValueError naming the file and the problem if latest.json, state.json (its keys and their
    types) or the tensors file is damaged. Folders of unfinished saves (``.tmp-*``) are ignored,
    except that if latest.json names a missing folder (what an earlier l3d_lens left when killed
    while saving a step a second time), the complete save of that step waiting in its
    ``.tmp-step-<n>-<pid>`` folder is read."""
    pointer = path / LATEST
    if not pointer.exists():
        return None
    if not pointer.is_file():
        raise damaged(path, pointer, "is not a file (a save writes the pointer to the latest checkpoint there)")
    latest = _json_object(path, pointer)
    if not (isinstance(latest.get("folder"), str) and STEP_FOLDER.fullmatch(latest["folder"])
            and is_a(latest.get("step"), int) and latest["step"] >= 0):
        raise damaged(path, pointer, f"must hold {{\"folder\": \"step-<n>\", \"step\": <n>}} as a save writes it, got "
                                     f"{reprlib.repr(latest)}")
    folder = path / latest["folder"]
    if not (folder / STATE).is_file():
        folder = _unmoved_save(path, latest["step"])
        if folder is None:
            raise FileNotFoundError(
                f"{path}: {LATEST} names {latest['folder']}, which is missing or incomplete, and no complete save of "
                f"step {latest['step']} is left beside it; this checkpoint cannot be resumed: remove the folder "
                f"or use a fresh checkpoint folder")
    state = _json_object(path, folder / STATE)
    if state.get("version") != VERSION:
        raise ValueError(f"{folder}: checkpoint version {state.get('version')!r}; this l3d_lens reads {VERSION}")
    missing = [k for k in STATE_TYPES if k not in state]
    if missing:
        raise damaged(path, folder / STATE, f"lacks {missing}, which every save writes")
    for k, kind in STATE_TYPES.items():
        if not is_a(state[k], kind):
            raise damaged(path, folder / STATE, f"{k!r} must be {TYPE_WORDS[kind]}, got {reprlib.repr(state[k])}")
    if not is_a(state.get("batching", 1), int):
        raise damaged(path, folder / STATE, f"'batching' must be an int, got {reprlib.repr(state['batching'])}")
    if state["step"] != latest["step"]:
        raise damaged(path, folder / STATE, f"holds step {state['step']}; {LATEST} names it step {latest['step']}")
    if not (folder / TENSORS).is_file():
        raise damaged(path, folder / TENSORS, "is missing")
    try:
        tensors = load_file(str(folder / TENSORS))
    except (SafetensorError, OSError) as e:
        raise damaged(path, folder / TENSORS, f"is not a readable safetensors file ({e})") from None
    return folder, state, tensors


def factor_shapes(path: Path) -> Optional[dict[str, tuple[int, ...]]]:
    """The shapes of the factors (``factor/<key>``) of the latest checkpoint in ``path``, read
    from its tensors file's header without the tensors; None where there is none or it cannot
    be read (``read`` then says why)."""
    try:
        latest = json.loads((path / LATEST).read_text())
        folder = path / latest["folder"]
        if not (folder / STATE).is_file():
            folder = _unmoved_save(path, latest["step"])
        shapes = tensor_shapes(folder / TENSORS)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if shapes is None else {k[len("factor/"):]: v for k, v in shapes.items() if k.startswith("factor/")}


def _json_object(path: Path, file: Path) -> dict[str, Any]:
    """The JSON object a save wrote in ``file``; the checkpoint's error otherwise."""
    try:
        out = json.loads(file.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise damaged(path, file, f"is not valid JSON ({e})") from None
    except RecursionError:  # nested deeper than the parser goes: no file a save writes
        raise damaged(path, file, "is nested too deep to be the JSON a save writes") from None
    if not isinstance(out, dict):
        raise damaged(path, file, f"holds a JSON {type(out).__name__}, not the object a save writes")
    return out


def _unmoved_save(path: Path, step: Any) -> Optional[Path]:
    """A ``.tmp-step-<step>-<pid>`` folder holding a complete save of ``step``: its state.json is
    written after its tensors, so a readable one with that step is complete."""
    if not isinstance(step, int):
        return None
    for tmp in sorted(path.glob(f".tmp-step-{step}-*")):
        try:
            state = json.loads((tmp / STATE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("step") == step and (tmp / TENSORS).is_file():
            return tmp
    return None


def check_tensors(path: Path, file: Path, tensors: dict[str, torch.Tensor],
                  expected: dict[str, tuple[tuple[int, ...], Optional[torch.dtype]]], optional: tuple[str, ...] = ()
                  ) -> None:
    """That ``tensors`` (read from ``file``) are exactly those of ``expected`` (name: shape, dtype;
    None: any floating-point dtype), those in ``optional`` perhaps missing, floating-point ones
    finite; the checkpoint's error otherwise."""
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise damaged(path, file, f"holds unexpected tensors {reprlib.repr(extra)}, which this run does not save")
    for k, (shape, dtype) in expected.items():
        t = tensors.get(k)
        if t is None:
            if k in optional:
                continue
            raise damaged(path, file, f"lacks {k!r}, expected shape {shape}")
        if tuple(t.shape) != shape:
            raise damaged(path, file, f"{k!r} has shape {tuple(t.shape)}; this run's is {shape}")
        if (t.dtype != dtype) if dtype is not None else not t.is_floating_point():
            raise damaged(path, file, f"{k!r} has dtype {t.dtype}; this run's is {dtype or 'floating point'}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise damaged(path, file, f"{k!r} holds NaN or inf; a checkpoint's values are finite")


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {f"adam/{i}/{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"], "state_keys": {str(i): list(st) for i, st in sd["state"].items()}}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state = {int(i): {k: tensors[f"adam/{i}/{k}"] for k in keys} for i, keys in meta["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
