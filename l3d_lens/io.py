"""Saving and loading decompositions: safetensors for the factors, JSON for the rest
(config, history, library and TransformerLens versions, a fingerprint of the decomposed
weights and one of the model's other parameters as the decomposition was computed on them, a
SHA-256 of the factors); the factors file's header holds a SHA-256 of the JSON's content. Loading
checks the format version, every key, history entry and factor the decomposition needs, that the
factors are those the JSON was saved with and the JSON unedited, the model's shapes and, by
default, its weights; a file from a newer l3d_lens loads with a warning."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import reprlib
import secrets
import time
import warnings
from importlib import metadata
from pathlib import Path
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .checks import is_int, is_number
from .config import L3DConfig
from .subnetworks import RANK_RULE, SIDES, key, resolve_ranks

FORMAT_VERSION = 1
#: how ``others_sha256`` records the model's other parameters (a save's fingerprint 'others_tl_version';
#: absent: 1, before weights kept in buffers, identity norms and unread copies were told apart)
OTHERS_VERSION = 2
FACTORS = "factors.safetensors"
META = "decomposition.json"
#: the model classes a save names (``Adapter.kind``); a decomposition loads onto any of them
ADAPTER_KINDS = ("hooked_transformer", "transformer_bridge", "module")
META_TYPES = {"config": dict, "adapter": str, "weights": list, "fingerprint": dict, "history": list, "versions": dict}
HISTORY_NEEDS = ("loss", "p_act", "n_dead")  # what the library reads of every epoch's record
#: what of the JSON shapes what a load gives; the factors file's header holds its SHA-256 (``META_SHA256``)
CONTENT = ("config", "adapter", "weights", "fingerprint", "model_dtype", "history", "factors_sha256")
META_SHA256 = "decomposition_json_sha256"
#: a dtype name as ``model_dtype`` records it (``dtype_name``), for messages
DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")
#: the temporary files of a save (``save``'s tag: process id, random hex)
LEFTOVER_AGE = 3600  # seconds a temporary file of a save is left to it (``remove_leftovers``)
LEFTOVER = re.compile(rf"\.(?:{re.escape(FACTORS)}|{re.escape(META)})\.(\d+)\.[0-9a-f]{{8}}\.tmp")


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("l3d_lens", "transformer_lens", "torch"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def save(dec, path) -> None:
    """Write ``path/`` (factors.safetensors, decomposition.json) so that a failed save leaves an
    earlier one there as it was (``write_pair``; the JSON records the factors' SHA-256).
    The factors file's header holds the SHA-256 of the JSON's content (``meta_sha256``), so that
    a load refuses a JSON edited by hand. The model is recorded as the decomposition was computed
    on it (``Decomposition``'s model record), with a warning if it changed since."""
    bad = [k for k, v in dec.factors.items() if not bool(torch.isfinite(v).all())]
    if bad:  # before anything is written: load would refuse them
        raise FloatingPointError(f"factor {bad[0]!r} holds NaN or inf: this decomposition's training diverged "
                                 f"(its history's loss: {dec.history[-1]['loss'] if dec.history else None}), so it "
                                 f"cannot be saved and loaded again; decompose again with a lower learning rate "
                                 f"(lr={dec.cfg.lr:g})")
    problem = history_problem(dec.history, dec.cfg.n_subnetworks)
    if problem:  # before anything is written: load would refuse it
        raise ValueError(f"this decomposition's history cannot be saved (Decomposition.load would refuse it): "
                         f"'history'{problem}")
    path = Path(path)
    check_folder(path)
    record = recorded_model(dec)
    path.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in dec.factors.items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "config": dec.cfg.to_dict(),
        "adapter": dec.adapter.kind,
        "weights": dec.weight_names,
        "fingerprint": record["fingerprint"],
        **({"model_dtype": record["model_dtype"]} if record.get("model_dtype") is not None else {}),
        "factors_sha256": tensors_sha256(tensors),
        "history": dec.history,
        "versions": versions(),
    }
    text = json.dumps(meta, indent=1)
    header = {"format_version": str(FORMAT_VERSION), "factors_sha256": meta["factors_sha256"],
              META_SHA256: meta_sha256(json.loads(text))}
    write_pair(path, FACTORS, lambda tmp: write_safetensors(tensors, tmp, header), META, lambda tmp: text)


def write_pair(path: Path, tensors_name: str, write_tensors: Callable[[Path], None], meta_name: str,
               meta_text: Callable[[Path], str]) -> None:
    """Write a save's two files into the folder ``path`` so that a failed save leaves an earlier
    one there as it was: the tensors (``write_tensors(tmp)``) and the JSON (``meta_text(tmp)`` of
    the written tensors file, which may record its hash) go to temporary names first, on the
    disk (``fsync``), then replace the old files, the JSON first. If the tensors' replace fails,
    the old JSON is put back, unless another save has replaced it since. Saves keep a hash of
    their tensors in the JSON, so one killed between the two replaces loads as an error, never
    as a mix. The temporary names (process id, random part) are ``LEFTOVER``'s."""
    old_meta = (path / meta_name).read_bytes() if (path / meta_name).is_file() else None
    tag = f"{os.getpid()}.{secrets.token_hex(4)}.tmp"  # two saves into one folder do not share temporary files
    tmp_tensors, tmp_meta = path / f".{tensors_name}.{tag}", path / f".{meta_name}.{tag}"
    try:
        write_tensors(tmp_tensors)
        text = meta_text(tmp_tensors)
        tmp_meta.write_text(text)
        fsync(tmp_meta)
        os.replace(tmp_meta, path / meta_name)
        try:
            os.replace(tmp_tensors, path / tensors_name)
        except BaseException:
            if old_meta is not None and _holds(path / meta_name, text):  # not another save's since
                tmp_meta.write_bytes(old_meta)
                os.replace(tmp_meta, path / meta_name)
            raise
        fsync(path)
    finally:
        for tmp in (tmp_tensors, tmp_meta):
            with contextlib.suppress(OSError):
                tmp.unlink()


def model_record(task) -> dict[str, Any]:
    """What a save records of the model: the fingerprint of the decomposed weights and of the
    other parameters (by the model's own names, and as ``others_sha256`` lays them out), and the
    model's dtype. ``decompose`` takes it when training ends and ``load`` keeps the saved one, so
    that a save records the model the factors were computed on, whatever was done to it since."""
    from .training import model_fingerprint

    model = model_fingerprint(task)
    return {"fingerprint": {**model["weights"], "others": model["others"], "others_tl": others_sha256(task),
                            "others_tl_version": OTHERS_VERSION},
            "model_dtype": dtype_name(task.adapter.model_dtype)}


def recorded_model(dec) -> dict[str, Any]:
    """``dec``'s model record (``model_record``), with a warning naming what of the model changed
    since it was taken; the model as it is now for a Decomposition built without one."""
    now = model_record(dec._task)
    record = dec._model_record
    if record is None:
        return now
    changed = _changes(dec._task, record, now)
    if changed:
        warnings.warn(f"the model changed since this decomposition was computed on it ({'; '.join(changed)}): the "
                      f"save records the model as it was then, and loads onto that model (onto this one only with "
                      f"check_weights=False); the analyses you run now run on the changed model, which the factors "
                      f"were not computed on", stacklevel=4)
    return record


def _changes(task, record: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What of the model differs from ``record``, in words, given its record ``now``; parts the
    record lacks (loaded from an earlier l3d_lens's save) or records in a version this l3d_lens
    does not know are not compared."""
    saved, fp, out = record["fingerprint"], now["fingerprint"], []
    if record.get("model_dtype") not in (None, now["model_dtype"]):
        out.append(f"its dtype: {record['model_dtype']} then, {now['model_dtype']} now")
    if (saved["shapes"], saved["sha256"]) != (fp["shapes"], fp["sha256"]):
        out.append("the decomposed weights")
    version = saved.get("others_tl_version", 1)
    if "others_tl" in saved and is_int(version) and 1 <= version <= OTHERS_VERSION:
        same = saved["others_tl"] == fp["others_tl"] if version == OTHERS_VERSION else \
            _same_others(task, saved["others_tl"], version)
    else:
        same = saved.get("others", fp["others"]) == fp["others"]
    if not same:
        out.append("the parameters outside the decomposed weights")
    return out


def meta_sha256(meta: dict[str, Any]) -> str:
    """SHA-256 of the JSON's ``CONTENT`` as parsed (keys sorted; an absent one counts as null):
    what the factors file's header vouches for. The config's device is left out: it says only
    where the factors load (load's device= chooses another), not what they are."""
    content = {k: meta.get(k) for k in CONTENT}
    if isinstance(content["config"], dict):
        content["config"] = {k: v for k, v in content["config"].items() if k != "device"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def remove_leftovers(path: Path) -> None:
    """Remove the temporary files (``LEFTOVER``) of saves into ``path`` that were killed before
    they could: those untouched for ``LEFTOVER_AGE`` seconds whose process is gone on this
    machine. A process id says nothing of other machines (a shared folder, every node of a job
    saving), so a recent file is left to a save that may still be running there. On Windows,
    where os.kill cannot ask whether a process lives, none is removed."""
    if os.name == "nt":
        return
    now = time.time()
    with contextlib.suppress(OSError):
        for file in path.iterdir():
            m = LEFTOVER.fullmatch(file.name)
            with contextlib.suppress(OSError):
                if m and now - file.stat().st_mtime > LEFTOVER_AGE and not alive(int(m[1])):
                    file.unlink()


def _holds(file: Path, text: str) -> bool:
    """Whether ``file`` still holds ``text``."""
    try:
        return file.read_text() == text
    except (OSError, ValueError):
        return False


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (one of another user counts: it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def check_folder(path: Path) -> None:
    """Raise, before anything is written, if ``path`` or the nearest of its parents that exists
    is not a folder, or a symbolic link to nothing comes first: a save is a folder of two files."""
    for existing in (path, *path.parents):
        if existing.is_symlink() and not existing.exists():
            raise ValueError(f"{existing} is a symbolic link to {os.readlink(existing)}, which does not exist: "
                             f"Decomposition.save cannot make the folder there; create its target, remove the "
                             f"link, or give another path")
        if existing.exists():
            if not existing.is_dir():
                raise ValueError(f"{existing} is a file, not a folder: Decomposition.save writes a folder ({FACTORS} "
                                 f"and {META}); give the path of a new or existing folder")
            return


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """A safetensors file with the permissions any new file gets (safetensors' save_file creates
    it readable by its owner only, whatever the umask: ranks or users sharing a folder could not
    read it, while the JSON beside it they could), on the disk when this returns (``fsync``)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~umask())
    fsync(path)


def fsync(path: Path) -> None:
    """Flush ``path`` to the disk: a file's data, so that a rename of it after a power loss does
    not name an empty file, or a folder's entries, so that the renames made in it persist. A
    folder that cannot be opened or flushed (Windows, some network file systems) is left as is:
    there the renames are as durable as the system makes them."""
    folder = path.is_dir()
    if folder:
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    else:  # Windows flushes only a file open for writing
        flags = os.O_RDWR if os.name == "nt" else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not (folder and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES)):
            raise
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only
    read it by setting it, which another thread could see)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def others_sha256(task, version: int = OTHERS_VERSION) -> str:
    """SHA-256 of the model's parameters outside the decomposed weights, as TransformerLens names
    and lays them out where the adapter has a site for them (a HookedTransformer and a
    TransformerBridge of the same weights agree), else by the model's own name; a bias of zeros
    counts as none (a HookedTransformer always has b_U, a bridge of a bias-free model has none).
    A parameter whose every byte the sites' parameters hold (a GPT-2 bridge's fused qkv, of
    which W_Q, W_K and W_V are views) is covered by them.

    ``version`` 2 also holds the weights the model keeps in buffers (a TransformerLens 4
    compatibility-mode bridge's folded b_U, under that name), counts an identity norm (scale of
    ones, bias of zeros) as none, as a folded HookedTransformer has none, and leaves out the
    parameters the forward never reads (that bridge's stale fused qkv); 1 is the record of
    saves before it."""
    from .training import _buffer

    adapter, chosen = task.adapter, {s.name for s in task.selected}
    parts = []
    for name in adapter.sites:
        if name in chosen:
            continue
        native = adapter.native_parameter(name)
        if native.is_meta:  # offloaded: no bytes to read here
            parts.append((name, native.dtype, tuple(native.shape), None))
            continue
        w = adapter.weight(name).detach()
        if not _absent(adapter.sites[name].kind, w, version):
            parts.append((name, w.dtype, tuple(w.shape), w))
    unread = adapter.unread if version >= 2 else set()
    parts += [(f"native:{n}", p.dtype, tuple(p.shape), None if p.is_meta else p.detach())
              for n, p in adapter.uncovered_parameters() if id(p) not in unread]
    if version >= 2:
        parts += [(n, w.dtype, tuple(w.shape), None if w.is_meta else w) for n, w in adapter.held_in_buffers().items()]
        parts += [(f"native:{n}", b.dtype, tuple(b.shape), None if b.is_meta else b.detach())
                  for n, b in adapter.uncovered_buffers()]
    h = hashlib.sha256()
    for name, dtype, shape, w in sorted(parts, key=lambda part: part[0]):
        h.update(f"{name}:{dtype}:{list(shape)}{'' if w is not None else ':meta'}".encode())
        if w is not None:
            h.update(_buffer(w))
    return h.hexdigest()


def _absent(kind: str, w: torch.Tensor, version: int) -> bool:
    """Whether a site's weight counts as none in ``others_sha256``: a bias of zeros, and from
    version 2 a norm's scale of ones or bias of zeros (an identity norm, which a folded
    HookedTransformer has no parameters for)."""
    if version >= 2 and kind == "ln_w":
        return bool((w == 1).all())
    return (kind.startswith("b_") or (version >= 2 and kind == "ln_b")) and not w.any()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of CPU tensors by name, dtype, shape and bytes (not of the file, whose header may vary)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{list(tensors[k].shape)}".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def load(path, model: nn.Module, divergence=None, check_weights: bool = True,
         device: Union[str, torch.device, None] = None):
    from .decomposition import Decomposition, build_task

    path = Path(path)
    if not (path / META).is_file() or not (path / FACTORS).is_file():
        raise FileNotFoundError(f"{path} is not a saved decomposition (needs {META} and {FACTORS})")
    meta = _read_meta(path / META)
    try:
        cfg = L3DConfig.from_dict(_as_saved(path / META, meta["config"]), divergence=divergence)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / META}, 'config': {e}") from None
    if cfg.sample == "token" and cfg.position != -1:  # saved before token mode refused it; it was unused
        cfg = cfg.replace(position=-1)
    _check_history(path / META, meta["history"], cfg.n_subnetworks)
    cfg = cfg.replace(device=_factor_device(path / META, cfg.device, device))
    try:
        task = build_task(model, cfg, saved=True)
    except ValueError as e:
        raise ValueError(f"{path / META}: the saved decomposition does not fit this model: {e}") from None
    task = _as_computed(path / META, task, meta["weights"])
    names = [s.name for s in task.selected]
    if check_weights:
        _check_model_dtype(path / META, meta.get("model_dtype"), task.adapter.model_dtype)
    saved = meta["fingerprint"]
    others = check_weights and ("others_tl" in saved or "others" in saved)
    fp = task.adapter.fingerprint(names)
    if others and "others_tl" in saved:  # in TransformerLens layout: any model class or TL version
        same_others = _same_others(task, saved["others_tl"], saved.get("others_tl_version", 1))
    elif others:  # saved before others_tl: by the model's own names, which differ between classes
        from .training import model_fingerprint

        same_others = model_fingerprint(task)["others"] == saved["others"]
    if fp["shapes"] != saved["shapes"]:
        diff = {n: (saved["shapes"].get(n), fp["shapes"].get(n)) for n in names if saved["shapes"].get(n) != fp["shapes"].get(n)}
        raise ValueError(f"{path / META}: weight shapes differ from the saved decomposition's (saved, this model): "
                         f"{diff}")
    if check_weights and fp["sha256"] != saved["sha256"]:
        raise ValueError("this model's weights differ from those the decomposition was computed on "
                         "(pass check_weights=False to load it anyway)")
    if others and not same_others:
        kind = "" if "others_tl" in saved or meta["adapter"] == task.adapter.kind else (
            f" (or only their names: it was saved from a {meta['adapter']} model by an l3d_lens that compared "
            f"them by the model's own names, and this is a {task.adapter.kind} model)")
        raise ValueError("this model's parameters outside the decomposed weights differ from those the decomposition "
                         f"was computed on{kind} (or the weights it keeps in buffers do, e.g. BatchNorm running "
                         f"statistics); they shape every gradient, so its coefficients would differ too "
                         "(pass check_weights=False to load it anyway)")
    if check_weights and not others:
        warnings.warn(f"{path / META} was saved by an earlier l3d_lens that did not fingerprint the model's other "
                      f"parameters: only the decomposed weights were checked", stacklevel=3)
    _check_not_edited(path, meta)  # after the checks that name what is wrong with a field
    target = task.device
    shapes = expected_shapes(task.selected, cfg, rank_rule(tensor_shapes(path / FACTORS), task.selected, cfg))
    factors = _read_factors(path / FACTORS, shapes, cfg.torch_dtype, target,
                            meta.get("factors_sha256"), path / META)
    return Decomposition(task, factors, meta["history"],
                         model_record={"fingerprint": saved, "model_dtype": meta.get("model_dtype")})


def _check_not_edited(path: Path, meta: dict[str, Any]) -> None:
    """ValueError unless the JSON's content is that the factors file's header was saved with
    (``meta_sha256``): an edited config, fingerprint or history would load silently and change
    what the analyses give. A header without it (a save from before it was recorded there) is
    not compared, nor one that cannot be read or of other factors than the JSON's (files of two
    saves): ``_read_factors`` says why."""
    try:
        with safe_open(str(path / FACTORS), "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError):
        return
    saved = header.get(META_SHA256)
    if header.get("factors_sha256", meta.get("factors_sha256")) != meta.get("factors_sha256"):
        return
    if saved is not None and saved != meta_sha256(meta):
        raise ValueError(f"{path / META} is not the JSON {path / FACTORS} was saved with (its header records the "
                         f"SHA-256 of the config, weights, fingerprint, model dtype and history): the JSON was "
                         f"edited after saving, or belongs to other factors; use the two files of one save, or "
                         f"decompose and save again")


def _same_others(task, saved: str, version: int) -> bool:
    """Whether the model's other parameters are those a save recorded (``others_sha256`` of its
    ``version``). A version-1 record also matches this model's version-2 one: the model it was
    saved from then had no weight buffer, identity norm or unread copy to hold (a folded
    HookedTransformer, loaded into its compatibility-mode bridge)."""
    if version > OTHERS_VERSION:
        raise ValueError(f"the saved decomposition records the model's other parameters in version {version} of its "
                         f"fingerprint; this l3d_lens computes 1 to {OTHERS_VERSION} (upgrade l3d_lens, or pass "
                         f"check_weights=False to load it unchecked)")
    if version == 1:
        return saved in (others_sha256(task, 1), others_sha256(task))
    return saved == others_sha256(task, version)


def _check_model_dtype(file: Path, saved: Any, now: torch.dtype) -> None:
    """The model's dtype as saved (decompositions saved before it was recorded have none): another
    one computes other gradients (at bfloat16's precision, a few percent), and its fingerprints
    differ too, which would otherwise read as other weights."""
    if saved is None:
        return
    here = dtype_name(now)
    if saved != here:
        raise ValueError(f"the decomposition was computed on a {saved} model and this one is {here}: its gradients, "
                         f"and so the coefficients, differ by the coarser dtype's rounding; load it into the model "
                         f"as it was (model.to(torch.{saved})), or pass check_weights=False to use it anyway")


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as a save records it: ``float32``, ``bfloat16`` (``torch.`` left off)."""
    return str(dtype).removeprefix("torch.")


def _as_computed(file: Path, task, saved: list[str]):
    """``task`` narrowed to the weights the decomposition was computed on, where its selectors
    now also select weights the l3d_lens that saved it could not decompose (e.g. K and V of a
    HookedTransformer whose key/value heads are as many as its query heads), with a warning;
    any other difference is an error."""
    names = [s.name for s in task.selected]
    if names == saved:
        return task
    narrower = [s for s in task.selected if s.name in set(saved)]
    if [s.name for s in narrower] != saved:
        raise ValueError(f"{file}: the saved decomposition covers {saved}, but on this model the selection gives "
                         f"{names}")
    extra = [n for n in names if n not in set(saved)]
    warnings.warn(f"{file}: on this model its components also select {extra}, which the l3d_lens that saved it did "
                  f"not decompose; loaded with the weights it was computed on", stacklevel=4)
    return dataclasses.replace(task, selected=narrower)


def _as_saved(file: Path, config: dict) -> dict:
    """A saved config as the l3d_lens that saved it ran it, for the fields that version took more
    loosely than ``L3DConfig`` does now, with a warning for each: a non-bool ``include_biases``
    counted by its truth (the string "False", which an earlier CLI's --set stored, is true), and
    a device string this torch cannot parse (e.g. 'npu:0' of a torch extension) becomes None,
    the model's device, as a device this machine lacks does."""
    config = dict(config)
    biases = config.get("include_biases", True)
    if not isinstance(biases, bool):
        config["include_biases"] = bool(biases)
        warnings.warn(f"{file}: include_biases is {biases!r}, which the l3d_lens that saved it counted as "
                      f"{bool(biases)}; loaded so (L3DConfig now takes True or False only)", stacklevel=4)
    device = config.get("device")
    if isinstance(device, str):
        try:
            torch.device(device)
        except (RuntimeError, ValueError):
            config["device"] = None
            warnings.warn(f"{file} was computed on device {device!r}, which this torch does not know; its factors "
                          f"load on the model's device (pass device= to choose another)", stacklevel=4)
    return config


def _factor_device(file: Path, saved: Any, given: Union[str, torch.device, None]) -> Optional[str]:
    """The device the factors load on, for the loaded config: ``given`` (load's device=), else the
    saved one if this machine has it, else None (the model's device, with a warning). The saved
    one is a device torch knows: ``L3DConfig`` checked it."""
    if given is not None:
        if not isinstance(given, (str, torch.device)):
            raise TypeError(f"device= must be a string or torch.device (e.g. 'cpu', 'cuda:1'), got {given!r}")
        try:
            dev = torch.device(given)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"device={given!r} is not a device torch knows ({str(e).splitlines()[0]}); "
                             f"e.g. 'cpu', 'cuda', 'cuda:1'") from None
        problem = unavailable(dev)
        if problem:
            raise ValueError(f"device={given!r}: {problem}")
        return str(dev)
    if saved is None:
        return None
    problem = unavailable(torch.device(saved))
    if problem:
        warnings.warn(f"{file} was computed on device {saved!r}, but {problem}; its factors load on the model's "
                      f"device (pass device= to choose another)", stacklevel=4)
        return None
    return saved


def unavailable(dev: torch.device) -> Optional[str]:
    """Why this machine cannot hold tensors on ``dev``, in words; None if it can (the CLI's
    device check uses it too)."""
    if dev.type == "meta":
        return "the meta device holds no values"
    # cuda, mps, xpu, ...: asked of the backend module torch has for the type; a type with none
    # (e.g. xla, whose package registers no torch.xla) is left to the first tensor put there
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None) if dev.type != "cpu" else None
    if callable(available) and not available():
        return f"no {dev.type} device is available to this torch ({torch.__version__})"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def expected_shapes(selected, cfg: L3DConfig, rule: int = RANK_RULE) -> dict[str, tuple[int, ...]]:
    """Shape of every factor ``init_factors`` builds for ``cfg``: core [K, *ranks], U<m> [K, I_m, R_m]
    (``rule``: how a fractional rank is read, ``subnetworks.RANK_RULE``)."""
    ranks = resolve_ranks(selected, cfg.rank, rule)
    out = {}
    for side in SIDES:
        for s in selected:
            r = ranks[s.name]
            out[key(side, s.name, "core")] = (cfg.n_subnetworks, *r)
            for m, (dim, rm) in enumerate(zip(s.shape, r)):
                out[key(side, s.name, f"U{m}")] = (cfg.n_subnetworks, dim, rm)
    return out


def tensor_shapes(file: Path) -> Optional[dict[str, tuple[int, ...]]]:
    """The shape of every tensor of a safetensors file, read from its header without the
    tensors; None where it cannot be read (the reading that follows says why)."""
    try:
        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError):
        return None


def rank_rule(shapes: Optional[dict[str, tuple[int, ...]]], selected, cfg: L3DConfig) -> int:
    """``RANK_RULE``, or 1 where factors of ``shapes`` are those an l3d_lens before rule 2 gave a
    fractional rank (of each mode of the TransformerLens tensor), and not this one's: such a save
    loads, and such a checkpoint resumes, as it was computed. None (nothing read) is this rule."""
    if shapes is None:
        return RANK_RULE
    now, earlier = (expected_shapes(selected, cfg, rule) for rule in (RANK_RULE, 1))
    return 1 if now != earlier and shapes == earlier else RANK_RULE


def read_json_object(file: Path, writer: str) -> dict:
    """The JSON object ``writer`` saved in ``file``; ValueError naming the file otherwise."""
    try:
        meta = json.loads(file.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    except RecursionError:  # nested deeper than the parser goes: no file a save writes
        raise ValueError(f"{file} is not the JSON {writer} writes (nested too deep to read)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} holds a JSON {type(meta).__name__}, not the object {writer} writes")
    return meta


def _read_meta(file: Path) -> dict:
    """The saved JSON, with every key ``save`` writes, of the right type; ValueError naming the
    file and the key otherwise. Warns if a newer l3d_lens saved it."""
    meta = read_json_object(file, "Decomposition.save")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # not True, not 1.0
        raise ValueError(f"{file}: format version {version!r}; this l3d_lens reads {FORMAT_VERSION} (an int)")
    missing = [k for k in META_TYPES if k not in meta]
    if missing:
        raise ValueError(f"{file} lacks the keys {missing}, which Decomposition.save always writes")
    for k, kind in META_TYPES.items():
        if not isinstance(meta[k], kind):
            raise ValueError(f"{file}: {k!r} must be a {kind.__name__}, got {reprlib.repr(meta[k])}")
    fp = meta["fingerprint"]
    if not (isinstance(fp.get("shapes"), dict) and isinstance(fp.get("sha256"), str)):
        raise ValueError(f"{file}: 'fingerprint' must be a dict with 'shapes' and 'sha256', got {reprlib.repr(fp)}")
    for k in ("others", "others_tl"):
        if not isinstance(fp.get(k, ""), str):
            raise ValueError(f"{file}: 'fingerprint'[{k!r}] must be a SHA-256 string, got {reprlib.repr(fp[k])}")
    others_version = fp.get("others_tl_version", 1)
    if not (is_int(others_version) and others_version >= 1):
        raise ValueError(f"{file}: 'fingerprint'['others_tl_version'] must be an int >= 1, "
                         f"got {reprlib.repr(others_version)}")
    if not isinstance(meta.get("factors_sha256", ""), str):
        raise ValueError(f"{file}: 'factors_sha256' must be a SHA-256 string, "
                         f"got {reprlib.repr(meta['factors_sha256'])}")
    if not all(isinstance(w, str) for w in meta["weights"]):
        raise ValueError(f"{file}: 'weights' must be a list of weight names (strings), as a save writes it, got "
                         f"{reprlib.repr(meta['weights'])}")
    dtype = meta.get("model_dtype")
    if dtype is not None and not (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)
                                  and dtype_name(getattr(torch, dtype)) == dtype):  # as a save writes it: no alias
        raise ValueError(f"{file}: 'model_dtype' must be a dtype name such as {', '.join(map(repr, DTYPE_NAMES))}, "
                         f"got {reprlib.repr(dtype)}")
    if meta["adapter"] not in ADAPTER_KINDS:
        raise ValueError(f"{file}: 'adapter' is {reprlib.repr(meta['adapter'])}; a save writes one of {ADAPTER_KINDS}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta["versions"].items()):
        raise ValueError(f"{file}: 'versions' must map package names to version strings, as a save writes them, "
                         f"got {reprlib.repr(meta['versions'])}")
    saved, mine = meta["versions"].get("l3d_lens"), versions()["l3d_lens"]
    if _major_minor(saved) > _major_minor(mine) and _major_minor(mine) > (-1, -1):
        warnings.warn(f"{file} was saved by l3d_lens {saved}, newer than the installed {mine}; "
                      f"upgrade l3d_lens if it does not behave as it did there", stacklevel=4)
    return meta


def _major_minor(version) -> tuple[int, int]:
    """(major, minor) of a version string; (-1, -1) if it has none (e.g. "unknown")."""
    m = re.match(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    return (int(m[1]), int(m[2])) if m else (-1, -1)


def _check_history(file: Path, history: list, n_subnetworks: int) -> None:
    """Every epoch's record is as ``history_problem`` checks it; ValueError naming the file and
    entry otherwise."""
    problem = history_problem(history, n_subnetworks)
    if problem:
        raise ValueError(f"{file}: 'history'{problem}")


def history_problem(history: list, n_subnetworks: int) -> Optional[str]:
    """What is wrong with a history (from "[i]", the entry), None if nothing: every epoch's record
    is a dict with what the library reads of it, of the right type, and a P_act per subnetwork
    (a save checks it before writing, a resumed checkpoint before it trains on)."""
    def count(v: Any) -> bool:
        return is_int(v) and v >= 0

    checks = {"loss": (is_number, "a number"), "lr": (is_number, "a number"), "epoch": (count, "an int >= 0"),
              "steps": (count, "an int >= 0"), "n_resampled": (count, "an int >= 0"),
              "n_dead": (lambda v: count(v) and v <= n_subnetworks, f"an int in 0..{n_subnetworks}"),
              "p_act": (lambda v: isinstance(v, list) and len(v) == n_subnetworks
                        and all(is_number(p) and 0 <= p <= 1 for p in v),
                        f"a list of {n_subnetworks} fractions in [0, 1], one per subnetwork")}
    if not isinstance(history, list):
        return f" must be a list (one record per epoch), got {reprlib.repr(history)}"
    for i, entry in enumerate(history):
        if not isinstance(entry, dict):
            return f"[{i}] must be a dict (one epoch's record), got {reprlib.repr(entry)}"
        missing = [k for k in HISTORY_NEEDS if k not in entry]
        if missing:
            return f"[{i}] lacks the keys {missing}, which training records for every epoch"
        for k, (ok, what) in checks.items():
            if k in entry and not ok(entry[k]):
                return f"[{i}][{k!r}] must be {what}, got {reprlib.repr(entry[k])}"
    return None


def _read_factors(file: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device,
                  sha256: Optional[str] = None, meta_file: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """The saved factors on ``device``, after checking that they are exactly those of ``shapes``,
    in ``dtype``, finite and (given the ``sha256`` that ``meta_file`` records) those saved with
    it; ValueError naming the file and tensor otherwise."""
    try:
        saved = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e})") from None
    mismatch = sha256 is not None and tensors_sha256(saved) != sha256

    def fail(problem: str):
        return ValueError(problem + (f"; also, its tensors' SHA-256 is not the one {meta_file.name} records"
                                     if mismatch else ""))

    extra = sorted(set(saved) - set(shapes))
    if extra:
        raise fail(f"{file} holds unexpected tensors {extra}, which this decomposition's config does not build")
    for k, shape in shapes.items():
        t = saved.get(k)
        if t is None:
            raise fail(f"{file} lacks {k!r}, expected shape {shape}")
        if not t.is_floating_point():
            raise fail(f"{file}: {k!r} has dtype {t.dtype}; expected a floating-point dtype")
        if t.dtype != dtype:
            raise fail(f"{file}: {k!r} has dtype {t.dtype}, but the config's dtype is {dtype} (save writes the "
                       f"factors in it; loading does not convert them)")
        if tuple(t.shape) != shape:
            raise fail(f"{file}: {k!r} has shape {tuple(t.shape)}; expected {shape}")
        if not torch.isfinite(t).all():
            raise fail(f"{file}: {k!r} holds NaN or inf; a trained decomposition's factors are finite")
    if mismatch:
        raise ValueError(f"{file} does not hold the factors {meta_file} was saved with (their SHA-256 differs): the "
                         f"two files come from different saves (one interrupted between writing them?) or one was "
                         f"edited; save the decomposition again")
    return {k: saved[k].to(device=device) for k in shapes}
