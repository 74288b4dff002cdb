"""Data-parallel L3D with torch.distributed (launched by torchrun, any backend).

Every rank holds the same factors and draws the same global batch (same seed, and the same
whole data on every rank, which ``training`` checks); each computes the statistics of its
contiguous shard. What makes the result equal to one process
on the global batch: references are drawn over the gathered global batch, batch top-k runs on
the gathered coefficients, the loss is normalised by the global sum of ||g||^2, and factor
gradients are summed over ranks before the (identical) Adam step. Every tensor handed to a
collective lives on the data's device (NCCL moves CUDA tensors only; gloo takes either).
"""

from __future__ import annotations

import hashlib
from typing import Optional, Union

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


def gather_cat(x: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """Every rank's tensor concatenated along dim 0 in rank order (sizes may differ), and the
    rows of the result that are this rank's."""
    if not active():
        return x, slice(0, x.shape[0])
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    counts = torch.cat(sizes).tolist()
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded.contiguous())
    start = sum(counts[: rank()])
    return torch.cat([p[:n] for p, n in zip(parts, counts)]), slice(start, start + x.shape[0])


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
    names = list(parts)
    rows = gather_ints([w for name in names for w in digest_words(parts[name])], device)
    out = {}
    for i, name in enumerate(names):
        words = [row[5 * i:5 * i + 5] for row in rows]
        if others := [r for r, w in enumerate(words) if w != words[0]]:
            out[name] = others
    return out
