"""A peak-memory estimate made before training starts, so that a selection that cannot fit
fails at once with the numbers, instead of after minutes (or an OOM kill).

The estimate adds: factors with their gradients and Adam moments; the Gram matrix's per-mode
factor products; the captured activations and output gradients (token mode: one output
gradient per target position); the model's own forward/backward activations (token mode: the
backward is batched over positions; a plain module: its leaf modules' outputs for one row, times
the batch); under torch.distributed, the outputs every rank gathers for the references; and, for
the exact engine, the materialised per-sample gradients. Parts that peak at different moments
are added, so it errs high more often than low. It is a guide, measured in BENCHMARKS.md
("Memory estimate", one step after a warm-up, RSS): on one attention block of TinyStories-8M
(fast engine) 1.2-1.5x high, and low on the smallest step (4 x 16 tokens: 0.87x, fixed costs it
leaves out); on every weight of a 6-layer model, 0.93x in token mode and 1.3x in sequence mode;
with a 20000-token vocabulary and position="all", 0.96x; at 2 ranks, 1.06-1.09x per rank. On a
2-layer model (d_model 128, vocab 5000), token mode 1.3-1.5x, and under engine="exact" reading
one position 1.7-1.9x. A plain module: 1.04x on an MLP (fast engine); under engine="exact",
0.99x (a 4 GiB step) and low on a small one (0.4x: a fixed cost of about 150 MiB is not
counted); a language model under engine="exact" in token mode, 1.35x.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import distributed
from .adapters import POSITIONS, TOKENS
from .engine.exact import chunk_rows
from .subnetworks import resolve_ranks
from .task import Task

GiB = 1024**3
#: copies of the logits live at the peak where the divergence reads every position, or one
ALL_POSITIONS_LOGITS, ONE_POSITION_LOGITS = 6, 3
#: copies of the logits of the exact engine's forward of a chunk that reads one position: the
#: logits at every position (measured: about half of one, vocab 5000)
EXACT_ONE_POSITION_LOGITS = 1
#: the fast token mode's batched backward: its working set per target position, in widest activations
BATCHED_WIDEST = 3
#: copies of the global batch's outputs each rank holds while drawing references under torch.distributed
GATHERED_COPIES = 1


def estimate(task: Task, batch_size: int, seq_len: int, row: Optional[torch.Tensor] = None) -> dict[str, int]:
    """Bytes per component of one training step's peak; ``row``: one row of the data (a plain
    module's activations are measured on it, ``row_activations``)."""
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
    # the fast token mode's output gradients come out of the batched backward target-major: the
    # contraction takes a contiguous copy of each, kept for the factors' backward
    douts = (2 if task.token_mode and cfg.engine == "fast" else 1) * per_target * sum(keys_out.values())
    captured = tokens * (abytes + copy) * (sum(keys_in.values()) + douts)
    # contraction intermediates: about one more captured-size tensor per factor side
    contraction = 2 * tokens * fbytes * per_target * cfg.n_subnetworks * max(1, max(
        (max(ranks[s.name]) for s in task.selected), default=1))
    model = _model_lm(task, tokens, seq_len, abytes) if lm else _model_module(task, batch_size, abytes, row)
    exact = 0
    if cfg.engine == "exact":
        # one tensor of every sample's gradient, the chunk being computed and its copy into it
        n_samples = batch_size * (seq_len if task.token_mode else 1)
        chunk = min(chunk_rows(task), n_samples)
        exact = (n_samples + 2 * chunk) * sum(math.prod(s.shape) for s in task.selected) * fbytes
    return {"factors and Adam state": factors, "Gram matrix factor products": gram,
            "captured activations and gradients": captured,
            "contractions": contraction, "model forward/backward": model, "per-sample gradients (exact)": exact,
            "outputs gathered from every rank": _gathered(task, batch_size, seq_len, abytes, row)}


def _model_lm(task: Task, tokens: int, seq_len: int, abytes: int) -> int:
    """A language model's forward/backward activations. The logits [tokens, d_vocab] come in
    several copies: where the divergence reads every position (token mode, position="all") the
    logits, log-probs, references, the divergence's terms and the logits' gradient are live
    together, ``ALL_POSITIONS_LOGITS`` of them (measured 6.3-6.6 at vocab 20000); reading one
    position, ``ONE_POSITION_LOGITS`` (measured 2.4)."""
    c, cfg = task.adapter.cfg, task.cfg
    d_mlp = getattr(c, "d_mlp", None) or 0
    layers = c.n_layers * (16 * c.d_model + 3 * c.n_heads * seq_len + 2 * d_mlp)
    per_target = seq_len if task.token_mode else 1
    if cfg.engine != "fast":
        # the exact engine: a no-grad forward of the batch for the references (its logits and
        # theirs), then, with the references kept, a forward and backward of a chunk of samples
        # at a time, each its whole sequence (``engine.exact.chunk_rows``): the larger of the two
        every = task.token_mode or cfg.position == "all"
        n_samples = tokens // seq_len * per_target
        chunk_tokens = min(chunk_rows(task), n_samples) * seq_len
        copies = ALL_POSITIONS_LOGITS if every else EXACT_ONE_POSITION_LOGITS
        references = (tokens if every else tokens // seq_len) * c.d_vocab
        chunk = chunk_tokens * (2 * layers + copies * c.d_vocab) + references
        return abytes * max(tokens * 2 * c.d_vocab, chunk)
    if task.token_mode:
        # the backward per target position is batched (is_grads_batched) and frees each
        # block's gradients as it goes down: its working set is a few of the widest
        # activations per target, whichever blocks it walks (``BATCHED_WIDEST``), plus the
        # logits' gradient without a head point; it runs after the logits' own peak, with two
        # copies of them still live
        widest = max(c.d_model, d_mlp, c.n_heads * seq_len)
        batched = BATCHED_WIDEST * widest + (0 if task.adapter.head_point else 2 * c.d_vocab)
        logits = max(ALL_POSITIONS_LOGITS * c.d_vocab, 2 * c.d_vocab + per_target * batched)
        return tokens * abytes * (layers + logits)
    copies = ALL_POSITIONS_LOGITS if cfg.position == "all" else ONE_POSITION_LOGITS
    return tokens * abytes * (2 * layers + copies * c.d_vocab)


def _model_module(task: Task, batch_size: int, abytes: int, row: Optional[torch.Tensor] = None) -> int:
    """A plain module's forward/backward activations: every leaf module's output is kept for the
    backward (the model's parameters require grad), the backward adds a few of the widest, and
    the divergence a few copies of the output (references, log-probs, its terms); measured
    1.0-1.2x of this on MLPs (BENCHMARKS.md "Memory estimate")."""
    kept, widest, out = row_activations(task.adapter, row)
    return batch_size * abytes * (kept + 3 * widest + 4 * out)


def row_activations(adapter, row: Optional[torch.Tensor] = None) -> tuple[int, int, int]:
    """(elements of every leaf module's output, of the widest one, of the model's output) for one
    row of a plain module. Found by a forward of ``row`` (one row of the data: a [1, T, d] input
    counts its T positions), or without it of one zero row when the first leaf module with
    weights is an nn.Linear, under no_grad and in eval mode (the model's RNG, buffers and modes
    are kept); otherwise, or if that forward fails, from its Linear layers' widths (each taken as
    followed by an elementwise activation)."""
    model = adapter.model
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    first = next((m for m in leaves if any(True for _ in m.parameters(recurse=False))), None)
    if row is not None or isinstance(first, nn.Linear):
        sizes: list[int] = []

        def hook(module, args, kwargs, output):
            sizes.append(sum(t[0].numel() for t in _tensors(output) if t.dim() > 0))

        if row is None:
            row = torch.zeros(1, first.in_features, dtype=adapter.model_dtype, device=adapter.device)
        row = row.to(adapter.device)
        devices = [adapter.device] if adapter.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), adapter.session(), torch.no_grad(), \
                    adapter.forward_hooks({m: hook for m in leaves}):
                output = adapter.forward(row)
            if sizes:
                return sum(sizes), max(sizes), output[0].numel()
        except Exception:  # noqa: BLE001 - a model that needs other inputs: fall back to its widths
            pass
    widths = [m.out_features for m in leaves if isinstance(m, nn.Linear)]
    if not widths:
        return 0, 0, 0
    return 2 * sum(widths), max(widths), widths[-1]


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    return []


def _gathered(task: Task, batch_size: int, seq_len: int, abytes: int, row: Optional[torch.Tensor] = None) -> int:
    """Under torch.distributed every rank gathers the whole batch's target-space outputs to draw
    references (``Task.references``): the gathered parts, their concatenation and the global
    references come on top of the local copies counted in the model's part, measured as about
    ``GATHERED_COPIES`` of the global batch's outputs (1.06-1.09x at 2 ranks), and as many again
    for the paired outputs. ``batch_size`` is this rank's share."""
    world = distributed.world()
    if world == 1:
        return 0
    cfg = task.cfg
    if task.adapter.is_language_model:
        # token mode gathers a row of d_vocab per position, sequence mode one row per sequence
        width = (seq_len if not task.token_mode and cfg.position == "all" else 1) * task.adapter.cfg.d_vocab
        rows = batch_size * (seq_len if task.token_mode else 1)
    else:
        width, rows = row_activations(task.adapter, row)[2], batch_size
    tbytes = max(abytes, 4) if cfg.divergence == "kl" else abytes
    copies = GATHERED_COPIES * (2 if cfg.reference == "paired" else 1)
    return world * rows * width * tbytes * copies


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


def check(task: Task, batch_size: int, seq_len: int, device: torch.device,
          row: Optional[torch.Tensor] = None, iterable: bool = False) -> None:
    """Raise MemoryError, with the estimate's parts and ``advice``, where the estimate exceeds the
    device's free memory; ``iterable``: the data is an iterable of batches (see ``advice``)."""
    parts = estimate(task, batch_size, seq_len, row)
    need = sum(parts.values())
    free = available(device)
    if free is not None and need > free:
        biggest = max(parts, key=parts.get)
        detail = ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in parts.items() if v)
        raise MemoryError(
            f"this decomposition needs about {need / GiB:.1f} GiB at its peak but {free / GiB:.1f} GiB is available "
            f"on {device} ({detail}); the largest part is {biggest}: {advice(task, iterable)}")


def advice(task: Task, iterable: bool = False) -> str:
    """What would shrink a run that does not fit, of the choices this one has left. An iterable
    of batches (a TokenStream, a DataLoader, a list) brings its own batch size, which the
    estimate uses and cfg.batch_size does not change: the advice names the stream's instead."""
    cfg = task.cfg
    if iterable:
        seq = (" or their sequence length (token mode holds an output gradient per position per target "
               "position)" if task.token_mode else "")
        ways = [f"reduce the data's own batch size (TokenStream(batch_size=...), DataLoader(batch_size=...); "
                f"cfg.batch_size does not apply to an iterable){seq}, n_subnetworks, rank or the selection"]
    else:
        ways = ["reduce batch_size, n_subnetworks, rank or the selection"]
    if task.token_mode:
        ways.append("use sample='sequence' (one divergence per sequence, not one per token)")
    if cfg.engine == "exact":
        ways.append("use engine='fast' (no per-sample gradient is formed)")
    return ", or ".join(ways)
