"""A peak-memory estimate made before training starts, so that a selection that cannot fit
fails at once with the numbers, instead of after minutes (or an OOM kill).

The estimate adds: factors with their gradients and Adam moments; the Gram matrix's per-mode
factor products; the captured activations and output gradients (token mode: one output
gradient per target position); the model's own forward/backward activations (token mode: the
backward is batched over positions); and, for the exact engine, the materialised per-sample
gradients. It is a guide, measured in BENCHMARKS.md ("Memory estimate"): on one attention block
it errs high by up to 2.1x, and low on the smallest step (4 x 16 tokens: 0.86x, fixed costs it
leaves out); on every weight of a 6-layer model, 0.85x in token mode and 1.3x in sequence mode.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from .adapters import POSITIONS, TOKENS
from .subnetworks import resolve_ranks
from .task import Task

GiB = 1024**3


def estimate(task: Task, batch_size: int, seq_len: int) -> dict[str, int]:
    """Bytes per component of one training step's peak."""
    cfg = task.cfg
    fbytes = torch.finfo(cfg.torch_dtype).bits // 8
    abytes = torch.finfo(task.adapter.model_dtype).bits // 8 if task.adapter.model_dtype.is_floating_point else 4
    ranks = resolve_ranks(task.selected, cfg.rank)
    n_factor = 0
    for s in task.selected:
        r = ranks[s.name]
        n_factor += math.prod(r) + sum(i * ri for i, ri in zip(s.shape, r))
    factors = 2 * cfg.n_subnetworks * n_factor * fbytes * 4
    # the Gram matrix <V_k, V_l> goes through per-mode factor products U_m^T U_m, [K, K, r_m, r_m]
    # for every mode of every weight, kept for the backward: with many weights, many subnetworks
    # and a high rank they outweigh the factors (BENCHMARKS.md "Memory estimate", every block weight)
    gram = cfg.n_subnetworks ** 2 * fbytes * sum(r * r for s in task.selected for r in ranks[s.name])
    lm = task.adapter.is_language_model
    tokens = batch_size * (seq_len if lm else 1)
    per_target = seq_len if task.token_mode else 1
    keys_in, keys_out = {}, {}
    for s in task.selected:
        site = s.site
        size = dict(zip(site.modes, site.shape))
        if site.input not in (None, TOKENS, POSITIONS):
            keys_in[site.input] = math.prod(size[m] for m in site.in_modes)
        keys_out[site.output] = math.prod(size[m] for m in site.out_modes)
    # the engine contracts them in the factors' dtype: where the model's differs, a copy of each
    # (kept for the backward) comes on top
    copy = fbytes if cfg.torch_dtype != task.adapter.model_dtype else 0
    captured = tokens * (abytes + copy) * (sum(keys_in.values()) + per_target * sum(keys_out.values()))
    # contraction intermediates: about one more captured-size tensor per factor side
    contraction = 2 * tokens * fbytes * per_target * cfg.n_subnetworks * max(1, max(
        (max(ranks[s.name]) for s in task.selected), default=1))
    model = 0
    if lm:
        c = task.adapter.cfg
        d_mlp = getattr(c, "d_mlp", None) or 0
        per_layer = 16 * c.d_model + 3 * c.n_heads * seq_len + 2 * d_mlp
        per_token = c.n_layers * per_layer + 2 * c.d_vocab
        if task.token_mode and cfg.engine == "fast":
            # the backward per target position is batched (is_grads_batched) and frees each
            # block's gradients as it goes down: its working set is a few of the widest
            # activations per target, whichever blocks it walks (12 of them covers the measured
            # peaks, BENCHMARKS.md "Memory estimate"), plus the logits' gradient without a head point
            widest = max(c.d_model, d_mlp, c.n_heads * seq_len)
            batched = 12 * widest + (0 if task.adapter.head_point else 2 * c.d_vocab)
            model = tokens * abytes * (per_token + per_target * batched)
        else:
            model = tokens * per_token * abytes * (1 + per_target)
    exact = 0
    if cfg.engine == "exact":
        n_samples = batch_size * (seq_len if task.token_mode else 1)
        exact = n_samples * sum(math.prod(s.shape) for s in task.selected) * fbytes * 2
    return {"factors and Adam state": factors, "Gram matrix factor products": gram,
            "captured activations and gradients": captured,
            "contractions": contraction, "model forward/backward": model, "per-sample gradients (exact)": exact}


def available(device: torch.device) -> Optional[int]:
    """Free bytes on the device (CUDA) or available RAM (Linux); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check(task: Task, batch_size: int, seq_len: int, device: torch.device) -> None:
    parts = estimate(task, batch_size, seq_len)
    need = sum(parts.values())
    free = available(device)
    if free is not None and need > free:
        biggest = max(parts, key=parts.get)
        detail = ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in parts.items() if v)
        raise MemoryError(
            f"this decomposition needs about {need / GiB:.1f} GiB at its peak but {free / GiB:.1f} GiB is available "
            f"on {device} ({detail}); the largest part is {biggest}: reduce batch_size, n_subnetworks, rank or the "
            f"selection, or use sample='sequence' / engine='fast'")
