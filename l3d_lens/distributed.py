"""Data-parallel L3D with torch.distributed (launched by torchrun, any backend).

Every rank holds the same factors and draws the same global batch (same seed, and the same
whole data on every rank, which ``training`` checks); each computes the statistics of its
contiguous shard. What makes the result equal to one process
on the global batch: references are drawn over the gathered global batch, batch top-k runs on
the gathered coefficients, the loss is normalised by the global sum of ||g||^2, and factor
gradients are summed over ranks before the (identical) Adam step. Every tensor handed to a
collective lives on the data's device (NCCL moves CUDA tensors only; gloo takes either). A rank
that fails alone in work with no collective of its own says so in the next ``gather_cat``
(``announce``), where the others raise ``RankFailed`` at once instead of waiting for it until the
process-group timeout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Optional, Union

import torch
import torch.distributed as dist


_LOCAL: ContextVar[bool] = ContextVar("l3d_lens_local", default=False)


def active() -> bool:
    """Whether l3d_lens works data-parallel here: a process group of more than one rank is
    initialised, outside ``local()``."""
    return not _LOCAL.get() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def local() -> Iterator[None]:
    """l3d_lens calls in this block run in this process alone, as without torch.distributed:
    under an initialised group ``decompose`` (and what calls it: ``compare_with_patching``,
    ``toy.sweep``) is collective, every rank must call it, and a call on one rank only (the
    analysis on rank 0 after training under torchrun) waited for the others until the
    process-group timeout. It holds in the thread (or asyncio task) that enters it: a thread
    started inside the block does not inherit it, so enter it in the thread that calls l3d_lens."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def shard_bounds(n: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of n items (earlier ranks get the extra)."""
    r, w = rank(), world()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if x is None or not active():
        return x
    a, b = shard_bounds(x.shape[0])
    return x[a:b]


class RankFailed(RuntimeError):
    """Another rank failed in work that has no collective of its own (``announce``): this rank
    stops with it rather than wait for it in a collective until the process-group timeout."""


FAILED = -1  # the row count ``announce`` sends in place of a rank's in ``gather_cat``


def gather_cat(x: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """Every rank's tensor concatenated along dim 0 in rank order (sizes may differ), and the
    rows of the result that are this rank's. Raises ``RankFailed`` if a rank ``announce``d it
    failed before this collective."""
    if not active():
        return x, slice(0, x.shape[0])
    counts = row_counts(x.shape[0], x.device)
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded.contiguous())
    start = sum(counts[: rank()])
    return torch.cat([p[:n] for p, n in zip(parts, counts)]), slice(start, start + x.shape[0])


def row_counts(n: int, device: Union[str, torch.device], failure: Optional[str] = None) -> list[int]:
    """Every rank's row count ``n`` (``FAILED`` from a rank that failed, with its ``failure``);
    if any rank failed, every rank then gathers the reasons and, unless it failed too, raises
    ``RankFailed`` naming each failed rank and why."""
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    counts = torch.cat(sizes).tolist()
    if FAILED in counts:
        failed = failures(gather_ints(reason_words(failure), device))
        if failure is None:
            raise RankFailed("; ".join(f"rank {r} failed {why}" for r, why in failed.items()) + "; every rank stops")
    return counts


def announce(failure: str, device: Union[str, torch.device]) -> None:
    """Tell the other ranks, waiting in (or on their way to) a ``gather_cat``, that this rank
    failed (``failure``: where and why, e.g. "at step 3 (epoch 0): ValueError: ..."), so that
    they raise ``RankFailed`` at once; the caller then raises its own error."""
    row_counts(FAILED, device, failure)


# errors of torch.distributed itself, or another rank's failure: no rank is left waiting to be told
PASSED_ON = (RankFailed, getattr(dist, "DistError", RankFailed))


@contextmanager
def announced(sharded: bool, where: str, device: Union[str, torch.device]) -> Iterator[None]:
    """Under ``sharded`` training, an error in the body (this rank's own work before a
    ``gather_cat``) is told to the other ranks (``announce``, as "<where>: <Error>: <message>")
    before it is raised, so that they raise ``RankFailed`` there instead of waiting for this rank
    until the process-group timeout; another rank's failure, or torch.distributed's own error
    (``PASSED_ON``), passes on as it is. Unsharded, nothing is added."""
    if not sharded:
        yield
        return
    try:
        yield
    except PASSED_ON:
        raise
    except Exception as e:
        announce(f"{where}: {type(e).__name__}: {e}", device)
        raise


REASON_BYTES = 512  # of a failed rank's reason sent to the others (a longer one is cut)


def reason_words(reason: Optional[str]) -> list[int]:
    """``reason`` (None: this rank did not fail) as 1 + REASON_BYTES int64s for ``gather_ints``:
    a failed flag and the reason's UTF-8 bytes, cut to REASON_BYTES and padded with zeros."""
    if reason is None:
        return [0] * (1 + REASON_BYTES)
    raw = reason.encode()
    if len(raw) > REASON_BYTES:
        raw = raw[:REASON_BYTES - 3] + b"..."
    return [1, *raw, *[0] * (REASON_BYTES - len(raw))]


def failures(rows: list[list[int]]) -> dict[int, str]:
    """The ranks whose ``reason_words`` (leading each gathered row) say they failed, each with its
    reason."""
    return {r: bytes(row[1:1 + REASON_BYTES]).rstrip(b"\0").decode(errors="ignore")
            for r, row in enumerate(rows) if row[0]}


def all_reduce_(*tensors: torch.Tensor) -> None:
    """In-place sum over ranks."""
    if active():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def sum_scalar(value: float, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float64) -> float:
    """``value`` summed over ranks, sent from ``device`` (the data's: NCCL needs a CUDA one)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=dtype, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()


def digest_words(text: Optional[str]) -> list[int]:
    """``text`` as 5 int64s for ``gather_ints``: 1 and its SHA-256 in 4 words (0s for None), so
    that any string is compared across ranks as one small tensor."""
    if text is None:
        return [0] * 5
    d = hashlib.sha256(text.encode()).digest()
    return [1] + [int.from_bytes(d[i:i + 8], "little", signed=True) for i in range(0, 32, 8)]


def gather_ints(values: list[int], device: Union[str, torch.device] = "cpu") -> list[list[int]]:
    """Every rank's ``values`` (as many on every rank), in rank order, sent from ``device``
    (the data's: NCCL needs a CUDA one); ``[values]`` without torch.distributed."""
    if not active():
        return [list(values)]
    t = torch.tensor(values, dtype=torch.long, device=device)
    parts = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(parts, t)
    return [p.tolist() for p in parts]


def differing(parts: dict[str, Optional[str]], device: Union[str, torch.device] = "cpu") -> dict[str, list[int]]:
    """The names of ``parts`` (the same names on every rank) whose value is not the same on every
    rank, each with the ranks whose value differs from rank 0's; every rank gets the same answer."""
    return compare(list(parts), gather_ints(part_words(parts), device))


def differing_or_failed(parts: dict[str, Optional[str]], failure: Optional[str],
                        device: Union[str, torch.device] = "cpu") -> tuple[dict[str, list[int]], dict[int, str]]:
    """``differing(parts)`` and the ranks that failed (``failure``: this rank's reason, None if it
    did not), each with its reason, in one collective; every rank gets the same answer."""
    rows = gather_ints(reason_words(failure) + part_words(parts), device)
    return compare(list(parts), [row[1 + REASON_BYTES:] for row in rows]), failures(rows)


def part_words(parts: dict[str, Optional[str]]) -> list[int]:
    return [w for value in parts.values() for w in digest_words(value)]


def compare(names: list[str], rows: list[list[int]]) -> dict[str, list[int]]:
    """``differing``'s answer from every rank's ``part_words`` of ``names``."""
    out = {}
    for i, name in enumerate(names):
        words = [row[5 * i:5 * i + 5] for row in rows]
        if others := [r for r, w in enumerate(words) if w != words[0]]:
            out[name] = others
    return out
