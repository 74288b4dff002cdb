"""A hand-written training step for the toy models that are chains of ``nn.Linear`` layers
(``SquareMLP``, ``SuperpositionModel``): MSE loss, its backward and a fused AdamW update made
with the same ATen kernels, in the same order and on the same strides, as ``loss.backward()`` and
``torch.optim.AdamW(fused=True).step()`` use. The parameters and losses are the same bit
for bit (``tests/test_toy_chain_step.py`` checks every toy model class against autograd); the
step skips autograd's graph and the optimizer's per-step bookkeeping, which cost about half of
the step on these 5-wide models (BENCHMARKS.md, "Toy models: training time").
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from jaxtyping import Float
from torch import nn
from torch.nn.modules import module as _module

from . import models

#: mean reduction, as ``nn.functional.mse_loss`` passes it to ATen
_MEAN = 1
_aten = torch.ops.aten
_GELU_BACKWARD, _THRESHOLD_BACKWARD = _aten.gelu_backward.default, _aten.threshold_backward.default
_MSE, _MSE_BACKWARD = _aten.mse_loss.default, _aten.mse_loss_backward.default


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch < 2.4 has no per-device query)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def linear_chain(model: nn.Module) -> Optional[list[tuple[nn.Linear, Optional[str]]]]:
    """``model`` as (layer, activation after it) pairs when ``ChainStep`` trains it exactly as
    autograd would: a ``SquareMLP`` or ``SuperpositionModel`` (not a subclass, whose forward may
    differ) with every parameter trainable and no module, parameter or global hook (which autograd
    would run), contiguous weights at least 2 wide on each side (autograd's matmul backward
    picks another order of operands for some width-1 strides), every parameter on one device in
    one dtype (one fused AdamW call), and no autocast on that device (whose casts the step does
    not make); None otherwise."""
    if type(model) is models.SquareMLP:
        layers = list(model.layers)
        chain = [(layer, "gelu") for layer in layers[:-1]] + [(layers[-1], None)]
    elif type(model) is models.SuperpositionModel:
        chain = [(model.encoder, None), (model.decoder, "relu")]
    else:
        return None
    hooked = any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                 for m in model.modules())
    hooked = hooked or any(getattr(_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))
    params = list(model.parameters())
    hooked = hooked or any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in params)
    shaped = all(layer.weight.is_contiguous() and min(layer.weight.shape) >= 2 for layer, _ in chain)
    one_kind = len({(p.device, p.dtype) for p in params}) == 1  # one fused AdamW call, as ``ChainStep`` makes
    autocast = one_kind and _autocast_on(params[0].device.type)  # autograd's forward would cast
    if hooked or not shaped or not one_kind or autocast or not all(p.requires_grad for p in params):
        return None
    return chain


class _Layer(NamedTuple):
    """One layer of the chain as a step reads it: its tensors, activation and places in the
    optimizer's parameter list."""

    weight: torch.Tensor
    weight_t: torch.Tensor
    bias: Optional[torch.Tensor]
    act: Optional[str]
    weight_index: int
    bias_index: Optional[int]


class ChainStep:
    """MSE + AdamW steps on ``chain`` (``linear_chain``) with the hyperparameters of ``opt``, a
    fused ``torch.optim.AdamW`` over the chain's model that is never stepped itself: its state is
    kept here, initialised as AdamW initialises it. Everything a step reads is looked up once
    here: detached views of the parameters (so no graph is built, in any grad mode) and of the
    weights' transposes, which AdamW's in-place update keeps current. The update calls the fused
    kernel as ``AdamW.step`` does, with one step count for all the parameters (AdamW keeps one
    per parameter, always equal here)."""

    def __init__(self, chain: list[tuple[nn.Linear, Optional[str]]], opt: torch.optim.AdamW):
        (group,) = opt.param_groups
        if group["amsgrad"] or group["maximize"] or not group.get("fused"):
            raise ValueError("ChainStep does fused AdamW without amsgrad or maximize only")
        params = list(group["params"])
        if len({(p.device, p.dtype) for p in params}) != 1:
            raise ValueError("ChainStep needs every parameter on one device in one dtype, as one fused AdamW call")
        index = {id(p): i for i, p in enumerate(params)}
        self.params = [p.detach() for p in params]  # same storage: no graph to build, no grad mode to set
        self.layers = []
        for layer, act in chain:
            w, b = index[id(layer.weight)], None if layer.bias is None else index[id(layer.bias)]
            bias = None if b is None else self.params[b]
            self.layers.append(_Layer(self.params[w], self.params[w].t(), bias, act, w, b))
        self.hyper = {"lr": group["lr"], "beta1": group["betas"][0], "beta2": group["betas"][1],
                      "weight_decay": group["weight_decay"], "eps": group["eps"]}
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.step = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        self.steps = [self.step] * len(self.params)

    def __call__(self, x: Float[torch.Tensor, "batch d_in"], y: Float[torch.Tensor, "batch d_out"]) -> torch.Tensor:
        """One step on the batch (x, y); returns the batch's loss before the update."""
        inputs, pre, out = [], [], []
        h = x
        for layer in self.layers:
            inputs.append(h)
            z = h.mm(layer.weight_t) if layer.bias is None else torch.addmm(layer.bias, h, layer.weight_t)
            h = z if layer.act is None else nn.functional.gelu(z) if layer.act == "gelu" else torch.relu(z)
            pre.append(z)
            out.append(h)
        loss = _MSE(h, y, _MEAN)
        g = _MSE_BACKWARD(torch.ones_like(loss), h, y, _MEAN)
        grads: list[Optional[torch.Tensor]] = [None] * len(self.params)
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            if layer.act == "gelu":
                g = _GELU_BACKWARD(g, pre[i])
            elif layer.act == "relu":
                g = _THRESHOLD_BACKWARD(g, out[i], 0)
            if layer.bias is not None:
                grads[layer.bias_index] = g.sum(0)
            grads[layer.weight_index] = g.t().mm(inputs[i])
            if i:
                g = g.mm(layer.weight)
        self.step.add_(1)
        torch._fused_adamw_(self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps, amsgrad=False,
                            maximize=False, grad_scale=None, found_inf=None, **self.hyper)
        return loss
