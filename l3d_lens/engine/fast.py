"""Fast engine, capture half: one batched forward and one backward give, for every decomposed
weight, its input activations and the per-sample gradients at its output.

For a weight used as ``out_t = in_t (x) W`` the per-sample gradient is
``sum_t in_t (x) dout_t``, so these two tensors determine everything L3D needs without ever
materialising a per-sample gradient. Sequence mode: one backward of sum_i D_i (samples are
independent sequences). Token mode: one backward per target position, batched with
``is_grads_batched`` (autograd only walks the graph above the lowest decomposed weight).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..adapters import POSITIONS, TOKENS
from ..config import autocast_context
from ..task import Task


@dataclasses.dataclass
class Captured:
    """Per batch: inputs[key] [n, pos, ...] and douts[key] [n, (target,) pos, ...]."""

    inputs: dict[str, torch.Tensor]
    douts: dict[str, torch.Tensor]
    tokens: Optional[torch.Tensor]
    divergence: torch.Tensor
    references: Optional[torch.Tensor] = None  # the references drawn, where asked for (``check_shortcut``)


def capture(task: Task, inputs: torch.Tensor, generator: Optional[torch.Generator],
            paired: Optional[torch.Tensor] = None, keep_references: bool = False) -> Captured:
    adapter = task.adapter
    adapter.check_layout()
    sites = [s.site for s in task.selected]
    slow = [s.name for s in sites if not s.fast]
    if slow:
        raise ValueError(f"engine='fast' cannot decompose {slow} (their input/output activations are not exposed); "
                         f"use engine='exact' or leave them out")
    in_keys = {s.input for s in sites if s.input not in (None, TOKENS, POSITIONS)}
    out_keys = {s.output for s in sites}
    # token mode: start the per-position backward at the unembedding's input (the divergence
    # at position u depends on it at u only), not at the [pos, batch, pos, d_vocab] logits
    head = adapter.head_point if task.token_mode else None
    if head is not None and any(adapter.capture_point(k)[0] is adapter.capture_point(head)[0]
                                or k == adapter.logits_point for k in out_keys):
        head = None
    if head is not None and any(m._forward_hooks or m._forward_pre_hooks for m in adapter.head_modules()):
        head = None  # a hook of the user's there may mix positions: take the backward from the logits
    if head is not None:
        out_keys = out_keys | {head}
    store_in: dict[str, torch.Tensor] = {}
    store_out: dict[str, list[torch.Tensor]] = {}
    hooks = {}
    by_module: dict[int, list[tuple[str, str]]] = {}
    modules = {}
    for key in in_keys | out_keys:
        module, role = adapter.capture_point(key)
        by_module.setdefault(id(module), []).append((key, role))
        modules[id(module)] = module

    def keep_input(key: str, value: torch.Tensor) -> None:
        """The input activation of ``key``'s weights; a second call must see the same values
        (TL 3.x runs ln1 once each for q, k and v), else in_1 (x) (dout_1 + dout_2) is wrong."""
        if value.shape[:1] != inputs.shape[:1]:
            raise batch_axis_error(key, value, inputs)
        if key not in store_in:
            store_in[key] = value.detach()
        elif store_in[key].shape != value.shape or not torch.allclose(store_in[key], value, rtol=0, atol=0,
                                                                      equal_nan=True):
            raise ValueError(f"engine='fast' cannot decompose the weights at {key}: the model calls that layer more "
                             f"than once per forward on different inputs (a shared layer); use engine='exact'")

    user_hooked = {mid for mid, m in modules.items() if m._forward_hooks}

    def make_output_hook(keys):
        """Runs first among the module's forward hooks: the weight's own output, before any hook
        of the user's changes it (the gradient then flows back through theirs). Their hooks get
        a copy, which one editing in place (``t[:, :, h] = 0``) may change."""
        def hook(module, args, kwargs, output):
            if output.shape[:1] != inputs.shape[:1]:  # a bias (no input captured) must be checked here
                raise batch_axis_error(keys[0], output, inputs)
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            for key in keys:
                store_out.setdefault(key, []).append(output)
            return output.clone() if id(module) in user_hooked else output
        return hook

    def make_input_hook(entries):
        """Runs last: the activation the next weight really reads, after every other hook."""
        def hook(module, args, kwargs, output):
            for key, role in entries:
                if role == "in":
                    if not args and "input" not in kwargs:
                        raise ValueError(f"engine='fast' cannot read the input of {key}: the layer was called without "
                                         f"a positional input (keywords {sorted(kwargs)}); use engine='exact'")
                    keep_input(key, args[0] if args else kwargs["input"])
                elif role == "out":
                    keep_input(key, output)
                elif role in kwargs:  # a keyword input, e.g. attention's query_input
                    keep_input(key, kwargs[role])
        return hook

    first = {}
    for mid, entries in by_module.items():
        outs = [key for key, role in entries if role == "out" and key in out_keys]
        ins = [(key, role) for key, role in entries if key in in_keys]
        if outs:
            first[modules[mid]] = make_output_hook(outs)
        if ins:
            hooks[modules[mid]] = make_input_hook(ins)

    with adapter.session(), torch.enable_grad():
        paired_outputs = None
        if paired is not None:
            with torch.no_grad():
                paired_outputs = adapter.forward(paired)
        with adapter.forward_hooks(hooks, first), autocast_context(task.cfg.autocast, inputs.device):
            outputs = adapter.forward(inputs)
        missing = sorted((in_keys - store_in.keys()) | (out_keys - store_out.keys()))
        if missing:
            raise RuntimeError(f"capture points {missing} did not fire during the forward pass; use engine='exact'")
        for site in sites:
            if site.input in (TOKENS, POSITIONS):
                _check_gathered_rows(adapter, site, store_out[site.output][0], inputs)
        refs = task.references(outputs, generator, paired_outputs)
        d = task.divergence(task.view(outputs), refs)
        if head is not None:
            head_tensor = store_out[head][-1]
            out_keys = out_keys - {head}
        keys = sorted(out_keys)
        tensors = [t for k in keys for t in store_out[k]]
        if head is not None:
            n, t = d.shape
            (g_head,) = torch.autograd.grad(d.sum(), head_tensor, retain_graph=True)
            cot = torch.zeros((t, *g_head.shape), dtype=g_head.dtype, device=g_head.device)
            idx = torch.arange(t, device=g_head.device)
            cot[idx, :, idx] = g_head.transpose(0, 1)
            grads = torch.autograd.grad(head_tensor, tensors, grad_outputs=cot, is_grads_batched=True,
                                        allow_unused=True)
            grads = [torch.zeros((t, *x.shape), dtype=x.dtype, device=x.device) if g is None else g
                     for g, x in zip(grads, tensors)]
            grads = [g.movedim(0, 1) for g in grads]
        elif task.token_mode:
            n, t = d.shape
            eye = torch.eye(t, dtype=d.dtype, device=d.device)
            cot = eye[:, None, :].expand(t, n, t)
            grads = torch.autograd.grad(d, tensors, grad_outputs=cot, is_grads_batched=True, allow_unused=True)
            grads = [torch.zeros((t, *x.shape), dtype=x.dtype, device=x.device) if g is None else g
                     for g, x in zip(grads, tensors)]
            grads = [g.movedim(0, 1) for g in grads]
        else:
            grads = torch.autograd.grad(d.sum(), tensors, allow_unused=True)
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, tensors)]
    # a module called several times on the same activation (TL 3.x applies ln1 once each for
    # q, k and v) gets the sum of the gradients at its outputs
    douts, i = {}, 0
    for k in keys:
        parts = grads[i: i + len(store_out[k])]
        i += len(parts)
        douts[k] = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
    return Captured(store_in, douts, inputs if adapter.is_language_model else None, d.detach(),
                    refs.detach() if keep_references else None)


def batch_axis_error(key: str, value: torch.Tensor, inputs: torch.Tensor) -> ValueError:
    return ValueError(f"engine='fast' needs the batch axis first in every decomposed weight's activations, but {key} "
                      f"saw shape {tuple(value.shape)} for a batch of {inputs.shape[0]} (the model reshapes its "
                      f"samples before this layer); use engine='exact'")


def _check_gathered_rows(adapter, site, output: torch.Tensor, tokens: torch.Tensor) -> None:
    """W_E and W_pos take a one-hot input: their output must be the rows W[token] / W[position].
    Not so for a scaled embedding (Gemma multiplies by sqrt(d_model) inside the module) or an
    offset position table (OPT reads row position + 2), where the gradient would be wrong."""
    w = adapter.weight(site.name).detach()
    rows = w[tokens] if site.input == TOKENS else w[: tokens.shape[1]]
    got = output.detach().to(rows.dtype)
    try:
        ok = torch.allclose(got, rows.expand_as(got), rtol=1e-4, atol=1e-6 * float(rows.abs().max()))
    except RuntimeError:  # shapes that do not broadcast
        ok = False
    if not ok:
        raise ValueError(f"engine='fast' cannot decompose {site.name} on this model: its output ({site.output}) is "
                         f"not the rows of {site.name} its input picks (a scaled or offset embedding, e.g. Gemma's "
                         f"sqrt(d_model) or OPT's position offset); use engine='exact' or leave it out")
