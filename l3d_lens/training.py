"""The training loop: Adam on the Tucker factors of V_in and V_out (the model never
changes), step decay of the learning rate per epoch, V_out renormalised after every step,
P_act and dead counts per epoch. Everything random comes from one generator seeded by
``cfg.seed``, so the same seed and data give a bit-identical result on one CPU, torch build
and thread count; with
``checkpoint`` set, an interrupted run resumes to the same bit-identical result. Under
torch.distributed, each rank trains on its shard of every global batch (see distributed.py):
the ranks check that they were given the same config, model and data (``check_same_run``,
``same_batches``) and took up the same checkpoint (``check_same_resume``); an iterable's batch
with fewer rows than ranks joins the one before, so that batch differs from a one-process run's.
With ``cfg.resample_epochs``, dead subnetworks are re-initialised at the start of those epochs
(``resampling.resample_dead``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import operator
import reprlib
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import L3DConfig, without_address
from .data import Data, batch_starts, batches, gather
from .decomposition import check_autograd
from .engine import NonFiniteGradient, batch_stats
from .io import history_problem, rank_rule
from .objective import aux_errors, loss_terms, sample_errors, topk_mask
from .resampling import resample_dead
from .selection import Selected, select
from .streaming import TokenStream
from .subnetworks import Factors, gram, init_factors, normalize_, resolve_ranks
from .task import Task


@dataclasses.dataclass
class EpochSums:
    """Running sums over the batches of the current epoch."""

    active: torch.Tensor
    last_active: torch.Tensor  # step at which each subnetwork was last in a batch top-k
    n_seen: int = 0
    loss_num: float = 0.0
    loss_den: float = 0.0
    n_resampled: int = 0  # dead subnetworks re-initialised at the start of this epoch


def data_fingerprint(data: Data) -> str:
    """What a checkpoint must have been trained on: a tensor, or a list/tuple of batches, by its
    bytes as training reads them (``_as_read``: ``x.int()`` is the same token ids as ``x``); a
    ``TokenStream`` by its settings, files and first batch (``TokenStream.fingerprint``); another
    iterable (a DataLoader that may shuffle) by its type only."""
    def digest(tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            h.update(str(list(t.shape)).encode())
            for part in _as_read(t):
                h.update(_buffer(part))
        return h.hexdigest()

    if isinstance(data, torch.Tensor):
        return f"tensor:{list(data.shape)}:" + digest([data])
    if isinstance(data, (list, tuple)):  # batches, or (data, reference) pairs
        return f"batches:{len(data)}:" + digest(t for b in data for t in (b if isinstance(b, (tuple, list)) else (b,)))
    if isinstance(data, TokenStream):
        return "tokenstream:" + data.fingerprint()
    return f"iterable:{type(data).__name__}"


PART = 1 << 22  # elements of integer data converted to int64 at a time to fingerprint it


def _as_read(t: torch.Tensor):
    """``t`` in parts to fingerprint one after another, as training reads it: token ids of another
    integer dtype as the int64 ``data.check_batch`` makes of them, a part at a time (the whole in
    int64 could take many times the data's memory); any other tensor whole."""
    if t.is_floating_point() or t.is_complex() or t.dtype in (torch.int64, torch.bool):
        return [t]
    flat = t.detach().reshape(-1)
    return (flat[i:i + PART].long() for i in range(0, flat.numel(), PART))


def _buffer(t: torch.Tensor):
    """A tensor's raw bytes as a buffer (no copy on the CPU; also for dtypes numpy lacks, e.g. bf16)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


def model_fingerprint(task: Task) -> dict[str, Any]:
    """What a checkpoint must have been trained on, of the model: the decomposed weights as
    ``Decomposition.load`` checks them (names, shapes, SHA-256), a SHA-256 of every other
    parameter (they shape every gradient too), by name, dtype, shape and bytes, and one of the
    weights it keeps in buffers (``Adapter.weight_buffers``: a compatibility-mode bridge's b_U,
    BatchNorm statistics; ``NO_BUFFERS`` where it has none, which a checkpoint from before
    buffers were recorded, without the key, is not compared on)."""
    names = [s.name for s in task.selected]
    decomposed = {id(task.adapter.native_parameter(n)) for n in names}
    others = ((name, p) for name, p in task.adapter.model.named_parameters() if id(p) not in decomposed)
    return {"weights": task.adapter.fingerprint(names), "others": named_sha256(others),
            "buffers": named_sha256(task.adapter.weight_buffers())}


def named_sha256(named) -> str:
    """SHA-256 of (name, tensor) pairs by name, dtype, shape and bytes (an offloaded, meta
    tensor by the first three: it has no bytes to read here)."""
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        if not t.is_meta:
            h.update(_buffer(t))
    return h.hexdigest()


#: ``model_fingerprint``'s "buffers" of a model that keeps no weight in a buffer
NO_BUFFERS = named_sha256([])


def older_stream(saved: Optional[str], now: Optional[str]) -> bool:
    """A TokenStream recorded by an earlier l3d_lens, by its type only: it cannot be checked
    against this one (``train`` warns and resumes, as for other parts it did not record)."""
    return saved == "iterable:TokenStream" and isinstance(now, str) and now.startswith("tokenstream:")


def resolved_device(device: Any, model_device: torch.device) -> Any:
    """A config's device as training uses it: None is the model's (``model_device``), and a CUDA
    device without an index the current one; a string this torch cannot parse stays as saved."""
    if device is None:
        return str(model_device)
    if not isinstance(device, str):
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return device
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def comparable(saved: dict[str, Any], now: dict[str, Any], model_device: torch.device) -> list[dict[str, Any]]:
    """Two configs (``to_dict`` form) as resuming compares them: a device given as None both
    times is the model's both times (the model may have moved since: the user's choice), else
    each as ``resolved_device`` gives it, so that device='cpu' and None on a CPU model are one run;
    a callable divergence without the memory address an earlier l3d_lens saved a partial or
    callable object with (``L3DConfig.to_dict``)."""
    out = [dict(saved), dict(now)]
    if not (saved.get("device") is None and now.get("device") is None):
        for c in out:
            c["device"] = resolved_device(c.get("device"), model_device)
    for c in out:
        if isinstance(c.get("divergence"), str):
            c["divergence"] = without_address(c["divergence"])
    return out


def same_selection(saved: dict[str, Any], now: dict[str, Any], task: Task) -> dict[str, Any]:
    """``saved`` (a checkpoint's config, ``to_dict`` form) with ``now``'s components where the two
    spell one selection of ``task``'s model (its selectors read as the l3d_lens that saved them
    read them): a selector a new run refuses as ambiguous ('blocks.1[0]' on a model of 12 layers)
    resumes under the spelling the refusal names, and 'blocks.0.attn' under 'blocks.0.attn.*'."""
    if saved.get("components") == now.get("components") or saved.get("include_biases") != now.get("include_biases"):
        return saved
    try:
        with warnings.catch_warnings():  # a dash range's reading is the one it was computed on: said at load
            warnings.simplefilter("ignore")
            theirs = select(task.adapter, tuple(saved["components"]), bool(saved["include_biases"]), saved=True)
    except (ValueError, TypeError, KeyError):
        return saved  # no selection of this model: the configs differ, as ``identity_mismatch`` says

    def units(sel: list[Selected]) -> list[tuple[str, Optional[int], Optional[tuple[int, ...]]]]:
        return [(s.name, s.axis, s.indices) for s in sel]

    return {**saved, "components": now["components"]} if units(theirs) == units(task.selected) else saved


def identity_mismatch(saved: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's identity and this run's, in words (parts the
    checkpoint does not record are left out)."""
    out = []
    if saved["config"] != identity["config"]:
        fields = sorted(k for k in {**saved["config"], **identity["config"]}
                        if saved["config"].get(k) != identity["config"].get(k))
        out.append("config (" + ", ".join(f"{k}: {saved['config'].get(k)!r} in the checkpoint, "
                                          f"{identity['config'].get(k)!r} now" for k in fields) + ")")
    now = identity["model"]
    if "model" in saved and "buffers" not in saved["model"]:  # written before buffers were recorded
        now = {k: v for k, v in now.items() if k != "buffers"}
    if "model" in saved and saved["model"] != now:
        if saved["model"].get("weights") != now["weights"]:
            out.append("model weights (the decomposed weights: "
                       + ("their names or shapes" if saved["model"].get("weights", {}).get("shapes")
                          != now["weights"]["shapes"] else "their values") + ")")
        elif saved["model"].get("others") != now.get("others"):
            out.append("model weights (outside the decomposed weights)")
        else:
            out.append("model weights kept in buffers (e.g. BatchNorm statistics, a folded b_U)")
    if saved["data"] != identity["data"] and not older_stream(saved["data"], identity["data"]):
        out.append("data")
    if "reference" in saved and saved["reference"] != identity["reference"] and not older_stream(
            saved["reference"], identity["reference"]):
        out.append("reference data (reference=)")
    if saved["world"] != identity["world"]:
        out.append(f"world size ({saved['world']} in the checkpoint, {identity['world']} now)")
    return out


ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")  # what torch.optim.Adam (amsgrad=False) keeps per parameter


@dataclasses.dataclass
class Fresh:
    """What ``train`` builds before resuming: a checkpoint must fit these."""

    f: Factors
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator


def check_identity(path: Path, folder: Path, identity: dict[str, Any]) -> None:
    """A checkpoint's identity has the parts ``identity_mismatch`` compares, of their types (model
    and reference may be missing: an earlier l3d_lens did not record them)."""
    model, reference = identity.get("model", {}), identity.get("reference")
    if not (isinstance(identity.get("config"), dict) and isinstance(identity.get("data"), str)
            and ckpt.is_a(identity.get("world"), int) and isinstance(model, dict)
            and isinstance(model.get("weights", {}), dict) and (reference is None or isinstance(reference, str))):
        raise ckpt.damaged(path, folder / ckpt.STATE, "'identity' must hold config (an object), data (a string), "
                                                      "world (an int), model (an object) and reference (a string or "
                                                      f"null) as a save writes them, got {reprlib.repr(identity)}")


def batch_rows(data: Data) -> Optional[list[int]]:
    """Rows of each batch of a list or tuple of batches (of a (data, reference) pair, its data's),
    which are in memory; None for another iterable, or where a batch is no tensor with a row axis
    (``data.batches`` refuses it)."""
    if not isinstance(data, (list, tuple)):
        return None
    firsts = [b[0] if isinstance(b, (tuple, list)) and len(b) == 2 else b for b in data]
    if not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in firsts):
        return None
    return [x.shape[0] for x in firsts]


def n_merged(data: Data, batch_size: int, min_batch: int) -> Optional[int]:
    """How many batches ``data.batches`` makes of ``data`` an epoch, where that is known without
    reading it: a tensor's (``batch_starts``), a list's or tuple's, whose batches gather rows until
    they have ``min_batch`` (a short tail joins the last); None for other iterables, or where
    ``batches`` makes none (it refuses data of too few rows)."""
    if isinstance(data, torch.Tensor):
        return len(batch_starts(data.shape[0], batch_size, min_batch))
    if (rows := batch_rows(data)) is None:
        return None
    try:
        return sum(1 for _ in gather(rows, int, operator.add, min_batch)) or None
    except ValueError:
        return None


def check_batching(path: Path, folder: Path, state: dict[str, Any], data: Data, min_batch: int) -> None:
    """Refuse, before anything is restored, a checkpoint of an iterable batched by other rules
    than this l3d_lens's (``ckpt.BATCHING``): its position would name other rows here, and the
    run would mix both batchings. One without the marker was written by an l3d_lens before it,
    under these rules or (before they came) under rules where a short batch joined the one
    before; where the two can cut the batches differently (an iterable with a short batch before
    its last, min_batch > 1) it warns, as it cannot tell which."""
    saved = state.get("batching")
    if saved == ckpt.BATCHING or isinstance(data, torch.Tensor) or min_batch <= 1:
        return
    where = (f"its position (step {state['step']}, epoch {state['epoch']}, batch {state['batch']}) would mean other "
             f"rows of this data, and the rest of the run would be batched otherwise")
    if saved is not None:
        raise ValueError(f"{folder / ckpt.STATE}: this checkpoint was written by another l3d_lens (batching rules "
                         f"{saved}, this one's {ckpt.BATCHING}), whose batching of an iterable's short batches (fewer "
                         f"than the {min_batch} rows a batch needs) differs: {where}; remove the folder {path} (or "
                         f"pass another checkpoint folder) to start this run afresh, or resume it with the l3d_lens "
                         f"version that wrote it")
    rows = batch_rows(data)
    if (data.batch_size >= min_batch if isinstance(data, TokenStream)
            else rows is not None and all(r >= min_batch for r in rows[:-1])):
        return
    warnings.warn(f"{folder / ckpt.STATE} records no batching rules: an l3d_lens before the gathering of short "
                  f"batches (fewer than the {min_batch} rows a batch needs) into batches of at least that many "
                  f"joined each to the one before, and if that one wrote this checkpoint, {where}; start afresh "
                  f"(remove the folder {path}) if you cannot tell", stacklevel=5)


def check_resumable(path: Path, folder: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor], fresh: Fresh,
                    cfg: L3DConfig, data: Data, min_batch: int) -> None:
    """Refuse, before anything is restored, a checkpoint of this run that cannot be resumed as
    saved: its position (step, epoch, batch), history, running sums, optimizer and scheduler
    state as a save of this run writes them, and every tensor it restores present with the shape
    and dtype of this run's, finite. ``ckpt.read`` checked the keys and types of the state."""
    state_file, tensors_file = folder / ckpt.STATE, folder / ckpt.TENSORS

    def bad(problem: str, file: Path = state_file) -> ValueError:
        return ckpt.damaged(path, file, problem)

    n_steps, epoch, batch, k = state["step"], state["epoch"], state["batch"], cfg.n_subnetworks
    if not 0 <= epoch <= cfg.epochs:
        raise bad(f"'epoch' is {epoch}; this run's epochs are 0 to {cfg.epochs}")
    n_batches = n_merged(data, cfg.batch_size, min_batch)
    if batch < 0 or n_steps < batch or (epoch == cfg.epochs and batch != 0) or (
            n_batches is not None and (batch > n_batches or n_steps != epoch * n_batches + batch)):
        raise bad(f"step {n_steps} at batch {batch} of epoch {epoch} is no position of this run "
                  f"({f'{n_batches} batches' if n_batches is not None else 'batches'} an epoch, {cfg.epochs} epochs)")
    history = state["history"]
    if len(history) != epoch or any(not isinstance(h, dict) or h.get("epoch") != i for i, h in enumerate(history)):
        raise bad(f"'history' must hold the records of epochs 0 to {epoch - 1}, got {reprlib.repr(history)}")
    problem = history_problem(history, k)
    if problem:  # the result would save, then fail to load
        raise bad(f"'history'{problem}")
    n_resampled = state.get("n_resampled", 0)
    if state["n_seen"] < 0 or not (ckpt.is_a(n_resampled, int) and 0 <= n_resampled <= k) or not (
            math.isfinite(state["loss_num"]) and math.isfinite(state["loss_den"]) and state["loss_den"] >= 0):
        raise bad(f"its running sums (n_seen {state['n_seen']!r}, loss_num {state['loss_num']!r}, loss_den "
                  f"{state['loss_den']!r}, n_resampled {n_resampled!r}) are not those a save writes")
    params = list(fresh.f.values())
    meta = state["optimizer"]
    keys, groups = meta.get("state_keys"), meta.get("param_groups")
    group = json.loads(json.dumps(fresh.opt.state_dict()["param_groups"][0]))  # as JSON gives it back
    if not (isinstance(keys, dict) and set(keys) <= {str(i) for i in range(len(params))}
            and all(isinstance(v, list) and sorted(v) == sorted(ADAM_STATE) for v in keys.values())
            and isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
            and all(groups[0][g] == group[g] for g in groups[0].keys() & group.keys() - {"lr"})
            and ckpt.is_a(groups[0].get("lr"), ckpt.NUMBER) and math.isfinite(groups[0]["lr"])):
        raise bad(f"'optimizer' is not the state of this run's Adam on its {len(params)} factors "
                  f"(state_keys {reprlib.repr(keys)}, param_groups {reprlib.repr(groups)})")
    sched, mine = state["scheduler"], json.loads(json.dumps(fresh.sched.state_dict()))
    if sched.get("last_epoch") != epoch or any(sched[g] != mine[g] for g in sched.keys() & mine.keys()
                                               - {"last_epoch", "_step_count", "_last_lr"}):
        raise bad(f"'scheduler' is not this run's learning-rate schedule at epoch {epoch}: {reprlib.repr(sched)}")
    expected: dict[str, tuple[tuple[int, ...], Optional[torch.dtype]]] = {
        **{f"factor/{name}": (tuple(t.shape), t.dtype) for name, t in fresh.f.items()},
        "rng": (tuple(fresh.gen.get_state().shape), torch.uint8), "active": ((k,), None), "last_active": ((k,), None)}
    for i in keys:
        p = params[int(i)]
        expected.update({f"adam/{i}/step": ((), None), f"adam/{i}/exp_avg": (tuple(p.shape), p.dtype),
                         f"adam/{i}/exp_avg_sq": (tuple(p.shape), p.dtype)})
    if isinstance(data, torch.Tensor):
        expected["order"] = ((data.shape[0],), torch.int64)
    ckpt.check_tensors(path, tensors_file, tensors, expected, optional=() if batch > 0 else ("order",))
    adam_steps = [float(tensors[f"adam/{i}/step"]) for i in keys]
    if any(not (0 <= s <= n_steps and s.is_integer()) for s in adam_steps) or any(
            (tensors[f"adam/{i}/exp_avg_sq"] < 0).any() for i in keys):
        raise bad(f"its Adam state (steps {adam_steps}, exp_avg_sq) is not one {n_steps} steps leave", tensors_file)
    if (tensors["active"] < 0).any() or ((tensors["last_active"] < 0) | (tensors["last_active"] > n_steps)).any():
        raise bad(f"'active' or 'last_active' is not one {n_steps} steps leave", tensors_file)
    if "order" in tensors and not torch.equal(tensors["order"].sort().values, torch.arange(data.shape[0])):
        raise bad(f"'order' is not an order of the {data.shape[0]} rows of the data", tensors_file)
    try:
        torch.Generator().set_state(tensors["rng"])
    except RuntimeError as e:
        raise bad(f"'rng' is not a random generator's state ({e})", tensors_file) from None


@dataclasses.dataclass
class Resumed:
    """Where a resumed checkpoint takes training up: its position, history, running sums and the
    epoch's data order (tensor data)."""

    n_steps: int
    start_epoch: int
    skip: int
    history: list[dict[str, Any]]
    sums: EpochSums
    order: Optional[torch.Tensor]


def resume(path: Path, identity: dict[str, Any], fresh: Fresh, task: Task, data: Data,
           min_batch: int) -> Optional[Resumed]:
    """Restore the checkpoint in ``path`` into ``fresh`` (factors, Adam, schedule, generator) once
    it is checked to be this run of ``task``'s and resumable; None (nothing restored) if there is
    none. The configs are compared as ``comparable`` gives them, selectors by the weights and
    units they select (``same_selection``)."""
    cfg = task.cfg
    if (saved := ckpt.read(path)) is None:
        return None
    folder, state, tensors = saved
    check_identity(path, folder, state["identity"])
    saved_identity = {**state["identity"], "config": L3DConfig.with_defaults(state["identity"]["config"])}
    configs = comparable(saved_identity["config"], identity["config"], task.adapter.device)
    configs[0] = same_selection(configs[0], configs[1], task)
    compared = [{**i, "config": c} for i, c in zip((saved_identity, identity), configs)]
    if differ := identity_mismatch(*compared):
        raise ValueError(f"checkpoint in {path} belongs to another run: {'; '.join(differ)} differ from this "
                         f"call's; use a fresh checkpoint folder (or remove this one) to start this run")
    check_batching(path, folder, state, data, min_batch)
    check_resumable(path, folder, state, tensors, fresh, cfg, data, min_batch)
    unrecorded = [part for part in ("model", "reference") if part not in saved_identity and identity[part] is not None]
    if ("model" in saved_identity and "buffers" not in saved_identity["model"]
            and identity["model"]["buffers"] != NO_BUFFERS):
        unrecorded.append("model's weights kept in buffers")
    unrecorded += [f"{part} (a TokenStream, known then by its type only)" for part in ("data", "reference")
                   if older_stream(saved_identity.get(part), identity[part])]
    if unrecorded:
        warnings.warn(f"checkpoint in {path} does not record the {' or '.join(unrecorded)} it was made with "
                      f"(an earlier l3d_lens wrote it), so it cannot be checked against this call's; resuming "
                      f"it as this run: if it was made for another model or other data, use a fresh "
                      f"checkpoint folder", stacklevel=5)
    with torch.no_grad():
        for k, t in fresh.f.items():
            t.copy_(tensors[f"factor/{k}"])
    ckpt.restore_optimizer(fresh.opt, tensors, state["optimizer"])
    fresh.sched.load_state_dict(state["scheduler"])
    if state["step"] > 0:  # Adam has stepped: no "lr_scheduler.step() before optimizer.step()" warning when an
        fresh.opt._opt_called = True  # epoch-0 checkpoint saved on its last batch resumes straight into sched.step()
    fresh.gen.set_state(tensors["rng"])
    sums = EpochSums(tensors["active"].double(), tensors["last_active"], state["n_seen"], state["loss_num"],
                     state["loss_den"], state.get("n_resampled", 0))
    n_steps, start_epoch, skip = state["step"], state["epoch"], state["batch"]
    # a TokenStream re-reads its source in the same order on every pass, and its fingerprint was checked
    if start_epoch < cfg.epochs and not isinstance(data, (torch.Tensor, list, tuple, TokenStream)):
        warnings.warn(f"the checkpoint in {path} resumes at step {n_steps} (epoch {start_epoch}, batch {skip}) "
                      f"on a {type(data).__name__}, which a checkpoint knows by its type only: the "
                      f"result equals an uninterrupted run's only if it yields the same batches in the same "
                      f"order on every pass (a DataLoader with shuffle=True does not, unless seeded anew "
                      f"for each pass); pass a tensor or a list of batches to resume exactly", stacklevel=5)
    return Resumed(n_steps, start_epoch, skip, state["history"], sums, tensors.get("order"))


def shard_stats(task: Task, f: Factors, x: torch.Tensor, gen: torch.Generator, paired: Optional[torch.Tensor],
                step_index: int, epoch: int):
    """``batch_stats`` of this rank's shard, a non-finite gradient raised as a FloatingPointError
    that names the step."""
    try:
        return batch_stats(task, f, x, gen, paired)
    except NonFiniteGradient as e:
        raise FloatingPointError(
            f"non-finite (NaN/inf) per-sample gradient for weight {e.name} at step {step_index} (epoch {epoch}); "
            f"check the model's outputs and the data of this batch") from None


def step(task: Task, f: Factors, opt: torch.optim.Optimizer, x: torch.Tensor, paired: Optional[torch.Tensor],
         gen: torch.Generator, sums: EpochSums, step_index: int, epoch: int) -> None:
    """One optimisation step on one global batch (this rank's shard of it)."""
    cfg = task.cfg
    if x.shape[0] < distributed.world():  # every rank sees the whole batch, so all stop here together
        raise ValueError(f"a batch of {x.shape[0]} rows cannot be split over {distributed.world()} ranks (step "
                         f"{step_index}, epoch {epoch}); give every batch at least one row per rank")
    x, paired = distributed.shard(x), distributed.shard(paired)
    # the others wait in a gather_cat (this step's, or a reference draw's): a failure here stops them
    with distributed.announced(task.sharded, f"at step {step_index} (epoch {epoch})", x.device):
        stats = shard_stats(task, f, x, gen, paired, step_index, epoch)
    coef_all, local = distributed.gather_cat(stats.A.detach())
    mask_all = topk_mask(coef_all, cfg.top_k)
    mask = mask_all[local]
    dead = (step_index - sums.last_active) >= cfg.dead_steps
    use_aux = cfg.aux_coef > 0 and (cfg.aux_epochs is None or epoch < cfg.aux_epochs) and bool(dead.any())
    # only subnetworks active somewhere in the global batch (or, for the aux loss, dead ones)
    # meet the Gram matrix: the rest are multiplied by zero, in the loss and its gradient
    cols = mask_all.any(0) | (dead.to(mask_all.device) if use_aux else False)
    idx = cols.nonzero().squeeze(1)
    f_out = {k: v.index_select(0, idx) for k, v in f.items() if k.startswith("out/")}
    A, B, kept = stats.A.index_select(1, idx), stats.B.index_select(1, idx), mask.index_select(1, idx)
    G = gram(f_out, task.selected)
    errors = sample_errors(A, B, stats.gsq, G, kept)
    norm = cfg.loss_norm if cfg.loss_norm_epochs is None or epoch < cfg.loss_norm_epochs else "batch"
    num, den_local = loss_terms(errors, stats.gsq, norm)
    den = distributed.sum_scalar(den_local, coef_all.device)
    if not den > 0:  # every gradient of the global batch is zero: nothing to fit (0/0 made the factors NaN)
        return
    loss = num / den
    if use_aux:
        dead_cols = dead.to(coef_all.device)
        aux_mask = topk_mask(coef_all * dead_cols, cfg.top_k * int(dead.sum()) / dead.numel())[local] & dead_cols
        frozen = {"frozen" + k[3:]: v.detach() for k, v in f_out.items()}
        G_frozen = gram({**f_out, **frozen}, task.selected, "frozen", "out")
        aux = aux_errors(A, B, errors, G_frozen, G, kept, aux_mask.index_select(1, idx)).sum()
        aux_den = distributed.sum_scalar(errors.detach().sum().item(), coef_all.device)
        loss = loss + cfg.aux_coef * aux / max(aux_den, 1e-30)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if distributed.active():
        distributed.all_reduce_(*[t.grad for t in f.values() if t.grad is not None])
    opt.step()
    normalize_(f, task.selected, "out")
    counts = mask_all.sum(0).double().cpu()
    sums.last_active[counts > 0] = step_index + 1
    sums.active += counts
    sums.n_seen += coef_all.shape[0]
    sums.loss_num += distributed.sum_scalar(num.item(), coef_all.device)
    sums.loss_den += den


SAME_DATA = ("every rank must pass the same config, model and whole data (not a DistributedSampler shard): each "
             "rank trains on its own share of every batch")


def check_same_run(fingerprints: dict[str, Any], device: torch.device) -> None:
    """Under torch.distributed, before any training: every rank was given the same config, model
    and data (``fingerprints``, as a checkpoint records them), or the result would match no
    single-process run (and data of different lengths would hang in a collective). Every rank
    raises the same ValueError, naming what differs."""
    words = {"model": "model (its parameters, or weights it keeps in buffers)", "data": "data",
             "reference": "reference data"}
    parts = {}
    for k, v in fingerprints.items():
        if k == "config":
            parts.update(config_parts(v))
        else:
            parts[words[k]] = json.dumps(v, sort_keys=True)
    differ = distributed.differing(parts, device)
    if differ:
        raise different_runs(differ)


def config_parts(config: Optional[dict[str, Any]]) -> dict[str, Optional[str]]:
    """A config (``to_dict`` form; None for a rank whose cfg is no L3DConfig) as the ranks compare
    it: by field, to name the one that differs, every field on every rank; a callable by its name,
    not its address; the device left out (each rank's own GPU, 'cuda:0', 'cuda:1', is the usual
    setup)."""
    return {f"config {f.name}": None if config is None else without_address(json.dumps(config[f.name], sort_keys=True))
            for f in dataclasses.fields(L3DConfig) if f.name != "device"}


def different_runs(differ: dict[str, list[int]]) -> ValueError:
    """The error every rank raises when the ranks were given different ``differ`` (what differs,
    with the ranks unlike rank 0: ``distributed.differing``)."""
    what = "; ".join(f"{k} (rank {', '.join(map(str, r))} unlike rank 0)" for k, r in differ.items())
    return ValueError(f"the ranks of this torch.distributed run were given different {what}; {SAME_DATA}")


def batch_digest(x: torch.Tensor, paired: Optional[torch.Tensor]) -> str:
    """SHA-256 of a batch (and its paired reference): shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for t in (x, paired) if paired is not None else (x,):
        h.update(f"{t.dtype}:{list(t.shape)}".encode())
        h.update(_buffer(t))
    return h.hexdigest()


def gather_or_stop(values: list[int], error: Optional[Exception], device: torch.device, failed: str) -> list[list[int]]:
    """Every rank's ``values`` (``distributed.gather_ints``), unless a rank met ``error`` before
    this collective: then that rank re-raises it and the others raise a ValueError saying which
    rank ``failed``, so that no rank waits in a later collective for one that stopped."""
    rows = distributed.gather_ints([int(error is not None), *values], device)
    if stopped := [r for r, row in enumerate(rows) if row[0]]:
        if error is not None:
            raise error
        raise ValueError(f"rank {', '.join(map(str, stopped))} {failed} (see its error); every rank stops")
    return [row[1:] for row in rows]


def same_batches(items, device: torch.device, epoch: int, first: int):
    """``items`` (an iterable's batches, from batch ``first`` of ``epoch``), each checked to be
    the same on every rank, and their end too: a rank whose data ran out would otherwise wait in
    a collective until the process-group timeout while another trains on. An iterable is
    fingerprinted up front by its type (a TokenStream by its first batch) only, as reading it
    whole would cost a pass. Every rank raises the same ValueError."""
    it = iter(items)
    for i in itertools.count(first):
        error = None
        try:
            item = next(it, None)
        except Exception as e:  # a batch this rank cannot read or merge: every rank stops, none waits
            item, error = None, e
        rows = gather_or_stop(distributed.digest_words(None if item is None else batch_digest(*item)), error,
                              device, f"failed while reading its data for batch {i} of epoch {epoch}")
        ended = [r for r, row in enumerate(rows) if row[0] == 0]
        if 0 < len(ended) < len(rows):
            raise ValueError(f"the data of rank {', '.join(map(str, ended))} ends after batch {i - 1} of epoch {epoch}, "
                             f"that of the other ranks does not; {SAME_DATA}")
        if unlike := [r for r, row in enumerate(rows) if row != rows[0]]:
            raise ValueError(f"batch {i} of epoch {epoch} differs between ranks (rank {', '.join(map(str, unlike))} "
                             f"unlike rank 0); {SAME_DATA}")
        if item is None:
            return
        yield item


def check_same_resume(path: Optional[Path], resumed: Optional[Resumed], f: Factors, error: Optional[Exception],
                      device: torch.device, every: int = 0) -> None:
    """Under torch.distributed, after each rank took up the checkpoint (or found none): all did
    the same. A folder some ranks do not see (a node-local disk, a relative path from another
    working directory) would have one rank resume and another start afresh, their gradients
    summed anyway. The ranks also save alike (a folder or none, every ``every`` steps): each save
    is a collective (``save_checkpoint``), where a rank that saves no checkpoint would leave the
    others waiting. A rank that failed re-raises its error; the others raise a ValueError."""
    digest = None
    if resumed is not None:
        h = hashlib.sha256(f"{resumed.n_steps}:{resumed.start_epoch}:{resumed.skip}".encode())
        for t in f.values():
            h.update(_buffer(t))
        digest = h.hexdigest()
    rows = gather_or_stop([int(path is not None), every, resumed.n_steps if resumed else -1]
                          + distributed.digest_words(digest), error, device, f"could not take up the checkpoint in {path}")
    if any(row[:2] != rows[0][:2] for row in rows):
        what = ", ".join(f"rank {r} {f'checkpoint_every={row[1]}' if row[0] else 'checkpoint=None'}"
                         for r, row in enumerate(rows))
        raise ValueError(f"the ranks of this torch.distributed run were given different checkpoint settings ({what}); "
                         f"every rank must pass the same checkpoint folder (shared storage) and checkpoint_every")
    if any(row != rows[0] for row in rows):
        what = ", ".join(f"rank {r} {'resumes step ' + str(row[2]) if row[3] else 'finds no checkpoint'}"
                         for r, row in enumerate(rows))
        raise ValueError(f"the ranks of this torch.distributed run took up different checkpoints from {path} ({what}); "
                         f"the checkpoint folder must be shared storage that every rank sees at the same path (an "
                         f"absolute path, or the same working directory)")


@torch.enable_grad()
def train(task: Task, data: Data, reference: Optional[Data], progress: bool = True,
          checkpoint: Union[str, Path, None] = None, checkpoint_every: int = 0) -> tuple[Factors, list[dict[str, Any]]]:
    """Train the factors on ``data``; returns them and the history (one record per epoch). Runs
    under torch.enable_grad(), so a caller under no_grad or set_grad_enabled(False) (as
    TransformerLens tutorials start) trains the same, bit for bit, and gets its mode back;
    under torch.inference_mode() it stops before any work (``check_autograd``). The checkpoint
    folder is locked (on rank 0) while the run trains (``ckpt.FolderLock``)."""
    check_autograd()
    with ckpt.FolderLock() as lock:
        return _train(task, data, reference, progress, checkpoint, checkpoint_every, lock)


def warn_diverged(epoch: int, loss: float, f: dict[str, torch.Tensor], lr: float) -> bool:
    """Warn, once (returns True when it did), that the run diverged: its loss or factors are
    non-finite. The run goes on, so that ``best_of`` and ``sweep`` rank it last by its NaN
    loss; ``Decomposition.save`` refuses its factors, which could not be loaded again."""
    bad = [k for k, t in f.items() if not bool(torch.isfinite(t).all())]
    if math.isfinite(loss) and not bad:
        return False
    what = f"factors {bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} hold NaN or inf" if bad else \
        "the factors are finite"
    warnings.warn(f"L3D diverged in epoch {epoch}: the reconstruction loss is {loss} and {what}; lower the learning "
                  f"rate (lr was {lr:g} this epoch)", stacklevel=6)
    return True


def check_epoch_batches(epoch: int, n_batches: int, first: Optional[tuple[int, int]]) -> tuple[int, int]:
    """(epoch, batch count) of this call's first epoch, once ``epoch`` read ``n_batches`` (a
    resumed epoch's skipped batches counted) and ``first`` is that of the epochs before (None in
    the first). An epoch of no batch would record loss 0 and every
    subnetwork dead, which ``best_of`` and ``sweep`` would rank first: a ValueError. Fewer
    batches than the first epoch's is a warning, as a stream may legitimately vary (a filtered
    or randomly drawn one), but data that only partly restarts would train on less than asked."""
    if n_batches == 0:
        raise ValueError(f"epoch {epoch} read no batch: the data gives no batches on a new pass (it is not "
                         f"re-iterable, e.g. a DataLoader over a one-shot IterableDataset or a generator, which "
                         f"the checks before training or the epochs before read up); pass a tensor, a list of "
                         f"batches, or an iterable that restarts on each iter(), e.g. l3d_lens.streaming.TokenStream")
    if first is None:
        return epoch, n_batches
    if n_batches < first[1]:
        warnings.warn(f"epoch {epoch} read {n_batches} batches, fewer than the {first[1]} of epoch {first[0]}: the "
                      f"data changed between passes (a source that does not restart fully on each iter()); "
                      f"pass a tensor, a list of batches, or an iterable that yields the same batches on each "
                      f"pass, e.g. l3d_lens.streaming.TokenStream", stacklevel=6)
    return first


def _train(task: Task, data: Data, reference: Optional[Data], progress: bool, checkpoint: Union[str, Path, None],
           checkpoint_every: int, lock: ckpt.FolderLock) -> tuple[Factors, list[dict[str, Any]]]:
    """``train``'s work; rank 0 takes ``lock`` on the checkpoint folder before reading it."""
    cfg = task.cfg
    task = dataclasses.replace(task, sharded=distributed.active())
    # an iterable's batch with fewer rows than ranks joins the one before, as one smaller than min_batch does
    min_batch = max(task.min_batch, distributed.world()) if task.sharded and not isinstance(data, torch.Tensor) \
        else task.min_batch
    path = Path(checkpoint) if checkpoint is not None else None
    fingerprints = None if path is None and not task.sharded else {
        "config": cfg.to_dict(), "model": model_fingerprint(task), "data": data_fingerprint(data),
        "reference": None if reference is None else data_fingerprint(reference)}
    if task.sharded:  # first: a rank that stops before this collective leaves the others waiting in it
        check_same_run(fingerprints, task.adapter.device)
    if task.sharded and isinstance(data, torch.Tensor):  # before any work: a batch too small to share
        n = data.shape[0]
        smallest = min(b - a for a, b in itertools.pairwise(batch_starts(n, cfg.batch_size, task.min_batch) + [n]))
        if smallest < distributed.world():
            raise ValueError(f"with {n} rows and batch_size={cfg.batch_size}, a batch of {smallest} rows cannot be "
                             f"split over {distributed.world()} ranks; choose them so every batch has a row per rank")
    identity = None if path is None else {**fingerprints, "world": distributed.world()}
    device = task.device
    gen = torch.Generator().manual_seed(cfg.seed)
    shapes = None if path is None else ckpt.factor_shapes(path)  # a checkpoint's: of an earlier rank rule?
    ranks = resolve_ranks(task.selected, cfg.rank, rank_rule(shapes, task.selected, cfg))
    f = init_factors(task.selected, ranks, cfg.n_subnetworks, gen, cfg.torch_dtype, device)
    for t in f.values():
        t.requires_grad_(True)
    opt = torch.optim.Adam(list(f.values()), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_decay)
    history: list[dict[str, Any]] = []
    n_steps, start_epoch, skip, order = 0, 0, 0, None
    sums = EpochSums(torch.zeros(cfg.n_subnetworks, dtype=torch.float64), torch.zeros(cfg.n_subnetworks))
    resumed, error = None, None
    try:
        if path is not None and distributed.rank() == 0:  # only rank 0 saves
            lock.take(path)
        resumed = None if path is None else resume(path, identity, Fresh(f, opt, sched, gen), task, data, min_batch)
    except Exception as e:
        if not task.sharded:
            raise
        error = e  # every rank stops with it (``check_same_resume``), none waits in a collective
    if task.sharded:
        check_same_resume(path, resumed, f, error, task.adapter.device, checkpoint_every)
    if resumed is not None:
        n_steps, start_epoch, skip = resumed.n_steps, resumed.start_epoch, resumed.skip
        history, sums, order = resumed.history, resumed.sums, resumed.order

    def save_checkpoint(epoch: int, batch: int) -> None:
        # a diverged run keeps its last finite checkpoint (``warn_diverged`` says why)
        if path is None or not all(bool(torch.isfinite(t).all()) for t in f.values()):
            return
        error = None
        if distributed.rank() == 0:  # rank 0 saves; the others learn below whether it could
            try:
                opt_tensors, opt_meta = ckpt.optimizer_tensors(opt)
                tensors = {**{f"factor/{k}": v for k, v in f.items()}, **opt_tensors, "rng": gen.get_state(),
                           "active": sums.active, "last_active": sums.last_active}
                if order is not None:
                    tensors["order"] = order
                ckpt.save(path, {"identity": identity, "step": n_steps, "epoch": epoch, "batch": batch,
                                 "history": history, "n_seen": sums.n_seen, "loss_num": sums.loss_num,
                                 "loss_den": sums.loss_den, "n_resampled": sums.n_resampled,
                                 "optimizer": opt_meta, "scheduler": sched.state_dict()}, tensors)
            except Exception as e:  # a full disk, a quota: the others must not wait in the next collective
                error = e
        if task.sharded:
            gather_or_stop([], error, task.adapter.device, f"failed to save the checkpoint at step {n_steps}")
        elif error is not None:
            raise error

    resample_at = set(cfg.resample_epochs)
    diverged = False
    first_count = None  # (epoch, batches) of this call's first epoch
    bar = tqdm(range(start_epoch, cfg.epochs), desc="L3D", disable=not progress or distributed.rank() != 0,
               unit="epoch", initial=start_epoch, total=cfg.epochs)
    for epoch in bar:
        if skip == 0:
            order = torch.randperm(data.shape[0], generator=gen) if isinstance(data, torch.Tensor) else None
        lr = opt.param_groups[0]["lr"]
        batch_index = skip
        items = batches(task.adapter, data, reference, cfg.batch_size, order, min_batch, skip, position=cfg.position)
        if task.sharded and not isinstance(data, (torch.Tensor, list, tuple)):  # those are compared whole up front
            items = same_batches(items, task.adapter.device, epoch, skip)
        for x, paired in items:
            x = x.to(task.adapter.device)
            paired = paired.to(task.adapter.device) if paired is not None else None
            if batch_index == 0 and epoch in resample_at:
                if n_steps < cfg.dead_steps:
                    warnings.warn(f"resampling at epoch {epoch} comes after {n_steps} steps, fewer than dead_steps="
                                  f"{cfg.dead_steps}: no subnetwork can count as dead yet, so none is resampled; "
                                  f"lower dead_steps or resample at a later epoch", stacklevel=4)
                sums.n_resampled = resample_dead(task, f, opt, x, paired, gen, sums.last_active, n_steps)
            step(task, f, opt, x, paired, gen, sums, n_steps, epoch)
            n_steps += 1
            batch_index += 1
            if checkpoint_every and n_steps % checkpoint_every == 0:
                save_checkpoint(epoch, batch_index)
        first_count = check_epoch_batches(epoch, batch_index, first_count)
        skip = 0
        sched.step()
        if cfg.aux_coef > 0 and epoch + 1 == min(cfg.aux_epochs or cfg.epochs, cfg.epochs) and n_steps <= cfg.dead_steps:
            warnings.warn(f"aux_coef={cfg.aux_coef} never applied: its {n_steps} steps end before any subnetwork "
                          f"can be dead for dead_steps={cfg.dead_steps} steps; lower dead_steps or raise "
                          f"{'aux_epochs' if cfg.aux_epochs is not None and cfg.aux_epochs < cfg.epochs else 'epochs'}",
                          stacklevel=4)
        p_act = sums.active / max(sums.n_seen, 1)
        if not diverged:
            diverged = warn_diverged(epoch, sums.loss_num / max(sums.loss_den, 1e-300), f, lr)
        record = {"epoch": epoch, "loss": sums.loss_num / max(sums.loss_den, 1e-300), "lr": lr, "steps": n_steps,
                  "p_act": p_act.tolist(), "n_dead": int((p_act == 0).sum()), "n_resampled": sums.n_resampled}
        history.append(record)
        sums = EpochSums(torch.zeros(cfg.n_subnetworks, dtype=torch.float64), sums.last_active)
        bar.set_postfix(loss=f"{record['loss']:.4f}", dead=record["n_dead"])
        if path is not None:
            save_checkpoint(epoch + 1, 0)
    for t in f.values():
        t.requires_grad_(False)
    if history and history[-1]["loss"] > 1:
        warnings.warn(f"the last epoch's reconstruction loss is {history[-1]['loss']:.6f}, above 1: the subnetworks "
                      f"reconstruct the gradients worse than none would (too few steps, or a learning rate, "
                      f"lr={cfg.lr:g}, too high or too low for these gradients)", stacklevel=5)
    return f, history
