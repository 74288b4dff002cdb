"""An independent oracle for the tests: per-sample gradients by a plain per-sample loop of
``torch.func.grad`` over a functional call on the model's *native* parameters, converted to
TransformerLens layout with hand-written einops patterns, and the L3D loss computed from
materialised gradients and subnetworks. Shares no code with the library's engines."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.func import functional_call, grad

BRIDGE = {  # TL kind -> (native attribute path under the block, einops native -> TL)
    "W_Q": ("attn.q", "weight", "(h d) m -> h m d"), "W_K": ("attn.k", "weight", "(h d) m -> h m d"),
    "W_V": ("attn.v", "weight", "(h d) m -> h m d"), "b_Q": ("attn.q", "bias", "(h d) -> h d"),
    "b_K": ("attn.k", "bias", "(h d) -> h d"), "b_V": ("attn.v", "bias", "(h d) -> h d"),
    "W_O": ("attn.o", "weight", "m (h d) -> h d m"), "b_O": ("attn.o", "bias", None),
    "W_in": ("mlp.in", "weight", "a b -> b a"), "b_in": ("mlp.in", "bias", None),
    "W_gate": ("mlp.gate", "weight", "a b -> b a"), "b_gate": ("mlp.gate", "bias", None),
    "W_out": ("mlp.out", "weight", "a b -> b a"), "b_out": ("mlp.out", "bias", None),
}


def native_of(model, tl_name: str):
    """(module-tree parameter path, native -> TL conversion) for a TL weight name."""
    if type(model).__name__ == "HookedTransformer" or not hasattr(model, "blocks"):
        return tl_name, lambda t: t
    paths = {id(m): n for n, m in model.named_modules()}
    h = model.cfg.n_heads

    def orig(mod):
        return getattr(mod, "original_component", None) or mod

    m = re.match(r"blocks\.(\d+)\.(attn|mlp|ln1|ln2)\.(\w+)$", tl_name)
    if m:
        block = model.blocks[int(m.group(1))]
        kind = m.group(3)
        if m.group(2) in ("ln1", "ln2"):
            mod = orig(getattr(block, m.group(2)))
            return f"{paths[id(mod)]}.{'weight' if kind == 'w' else 'bias'}", lambda t: t
        sub, attr, pattern = BRIDGE[kind]
        mod = block
        for part in sub.split("."):
            mod = getattr(mod, part)
        mod = orig(mod)
        conv = (lambda t: rearrange(t, pattern, **({"h": h} if " h" in pattern or "(h" in pattern else {}))) if pattern else (lambda t: t)
        return f"{paths[id(mod)]}.{attr}", conv
    top = {"embed.W_E": ("embed", "weight", None), "pos_embed.W_pos": ("pos_embed", "weight", None),
           "unembed.W_U": ("unembed", "weight", "a b -> b a"), "unembed.b_U": ("unembed", "bias", None),
           "ln_final.w": ("ln_final", "weight", None), "ln_final.b": ("ln_final", "bias", None)}[tl_name]
    mod = orig(getattr(model, top[0]))
    conv = (lambda t: rearrange(t, top[2])) if top[2] else (lambda t: t)
    return f"{paths[id(mod)]}.{top[1]}", conv


def _out(o):
    return o if isinstance(o, torch.Tensor) else o.logits


def per_sample_grads(model, names, inputs, ref_inputs, sample: str, position=-1, divergence="kl", ref_outputs=None):
    """{TL name: [n_samples, *TL shape]} with paired references (reference output = the
    model's output on ref_inputs at the same position), or the given ``ref_outputs``."""
    natives = {n: native_of(model, n) for n in names}
    params = {path: model.get_parameter(path).detach().clone() for path, _ in natives.values()}
    with torch.no_grad():
        ref_out = _out(model(ref_inputs)) if ref_outputs is None else ref_outputs

    def div(out, ref):
        if divergence == "kl":
            return F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum")
        return 0.5 * ((out - ref) ** 2).sum()

    grads = []
    lm = inputs.dim() == 2 and not inputs.is_floating_point()
    for i in range(inputs.shape[0]):
        positions = range(inputs.shape[1]) if (lm and sample == "token") else [None]
        for t in positions:
            def loss(p):
                out = _out(functional_call(model, p, (inputs[i : i + 1],), strict=False, tie_weights=False))[0]
                if not lm:
                    return div(out, ref_out[i])
                if t is not None:
                    return div(out[t], ref_out[i, t])
                if position == "all":
                    return sum(div(out[s], ref_out[i, s]) for s in range(out.shape[0]))
                return div(out[position], ref_out[i, position])

            g = grad(loss)(params)
            grads.append({n: conv(g[path]) for n, (path, conv) in natives.items()})
    return {n: torch.stack([g[n] for g in grads]) for n in names}


def loss_and_coefficients(grads, encoders, subnetworks, top_k: float):
    """(coefficients [S, K], normalised top-k reconstruction loss) from materialised tensors."""
    names = list(grads)
    S = grads[names[0]].shape[0]
    g = torch.cat([grads[n].reshape(S, -1) for n in names], 1)
    v_in = torch.cat([encoders[n].reshape(encoders[n].shape[0], -1) for n in names], 1)
    v_out = torch.cat([subnetworks[n].reshape(subnetworks[n].shape[0], -1) for n in names], 1)
    coef = g @ v_in.T
    keep = max(1, int(round(top_k * coef.numel()))) if top_k < 1 else coef.numel()
    threshold = coef.detach().abs().flatten().sort(descending=True).values[keep - 1]
    c = torch.where(coef.abs() >= threshold, coef, torch.zeros_like(coef))
    loss = ((g - c @ v_out) ** 2).sum() / (g**2).sum()
    return coef, loss
