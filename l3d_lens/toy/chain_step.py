"""A hand-written training step for the toy models that are chains of ``nn.Linear`` layers
(``SquareMLP``, ``SuperpositionModel``): MSE loss, its backward and a fused AdamW update made
with the same ATen calls, in the same order and on the same strides, as ``loss.backward()`` and
``torch.optim.AdamW(fused=True).step()`` make them. The parameters and losses are the same bit
for bit (``tests/test_toy_chain_step.py`` checks every toy model class against autograd); the
step skips autograd's graph and the optimizer's per-step bookkeeping, which cost about half of
the step on these 5-wide models (BENCHMARKS.md, "Toy models: training time").
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import nn
from torch.nn.modules import module as _module
from torch.optim.adamw import adamw

from . import models

#: mean reduction, as ``nn.functional.mse_loss`` passes it to ATen
_MEAN = 1


def linear_chain(model: nn.Module) -> Optional[list[tuple[nn.Linear, Optional[str]]]]:
    """``model`` as (layer, activation after it) pairs when ``ChainStep`` trains it exactly as
    autograd would: a ``SquareMLP`` or ``SuperpositionModel`` (not a subclass, whose forward may
    differ) with every parameter trainable and no module, parameter or global hook (which autograd
    would run), and contiguous weights at least 2 wide on each side (autograd's matmul backward
    picks another order of operands for some width-1 strides); None otherwise."""
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
    if hooked or not shaped or not all(p.requires_grad for p in params):
        return None
    return chain


class ChainStep:
    """MSE + AdamW steps on ``chain`` (``linear_chain``) with the hyperparameters of ``opt``, a
    fused ``torch.optim.AdamW`` over the chain's model that is never stepped itself: its state is
    kept here, initialised as AdamW initialises it."""

    def __init__(self, chain: list[tuple[nn.Linear, Optional[str]]], opt: torch.optim.AdamW):
        (group,) = opt.param_groups
        if group["amsgrad"] or group["maximize"] or not group.get("fused"):
            raise ValueError("ChainStep does fused AdamW without amsgrad or maximize only")
        self.chain = chain
        self.params = list(group["params"])
        self.beta1, self.beta2 = group["betas"]
        self.lr, self.eps, self.weight_decay = group["lr"], group["eps"], group["weight_decay"]
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]
        self.index = {id(p): i for i, p in enumerate(self.params)}

    @torch.no_grad()
    def __call__(self, x: Float[torch.Tensor, "batch d_in"], y: Float[torch.Tensor, "batch d_out"]) -> torch.Tensor:
        """One step on the batch (x, y); returns the batch's loss before the update."""
        inputs, pre, out = [], [], []
        h = x
        for layer, act in self.chain:
            inputs.append(h)
            z = h.mm(layer.weight.t()) if layer.bias is None else torch.addmm(layer.bias, h, layer.weight.t())
            h = z if act is None else nn.functional.gelu(z) if act == "gelu" else torch.relu(z)
            pre.append(z)
            out.append(h)
        loss = torch.ops.aten.mse_loss(h, y, _MEAN)
        g = torch.ops.aten.mse_loss_backward(torch.ones_like(loss), h, y, _MEAN)
        grads: list[Optional[torch.Tensor]] = [None] * len(self.params)
        for i in reversed(range(len(self.chain))):
            layer, act = self.chain[i]
            if act == "gelu":
                g = torch.ops.aten.gelu_backward(g, pre[i])
            elif act == "relu":
                g = torch.ops.aten.threshold_backward(g, out[i], 0)
            if layer.bias is not None:
                grads[self.index[id(layer.bias)]] = g.sum(0, keepdim=True).view(layer.bias.shape)
            grads[self.index[id(layer.weight)]] = g.t().mm(inputs[i])
            if i:
                g = g.mm(layer.weight)
        adamw(self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps, fused=True,
              amsgrad=False, beta1=self.beta1, beta2=self.beta2, lr=self.lr, weight_decay=self.weight_decay,
              eps=self.eps, maximize=False)
        return loss
