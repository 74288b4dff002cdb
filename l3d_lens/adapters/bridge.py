"""Adapter for TransformerLens 3.x/4.x ``TransformerBridge`` (raw or compatibility mode).

The bridge keeps weights in the wrapped modules (``blocks.i.attn.q`` as nn.Linear [out, in],
or HF Conv1D [in, out]). This adapter exposes them in TransformerLens layout
(``W_Q`` [n_heads, d_model, d_head], ...), converts back for functional calls, and checks
its conversion against the bridge's own ``W_Q``-style views where the bridge has them.
Parameters are addressed by module-tree path, never by the bridge's aliased names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable, Optional

import torch
from torch import nn

from .base import IN_BUFFER, POSITIONS, TOKENS, Site, TransformerLensAdapter, gqa_reason, identity, zero_bias


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _computes_with_copies(mlp: Optional[nn.Module]) -> bool:
    """TransformerLens 3.x's compatibility-mode gated MLP runs on ``_processed_W_*`` tensors
    taken from its parameters, so a functional call that substitutes a parameter misses it."""
    return mlp is not None and bool(getattr(mlp, "_use_processed_weights", False)) and any(
        k.startswith("_processed_W") and isinstance(v, torch.Tensor) for k, v in vars(mlp).items())


class BridgeAdapter(TransformerLensAdapter):
    kind = "transformer_bridge"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._paths = {id(m): n for n, m in model.named_modules()}
        self._hooks = model.hook_dict
        cfg = self.cfg
        h, dh = cfg.n_heads, cfg.d_head
        self._copies: list[nn.Module] = []  # MLPs run on parameters, not copies, in a session
        explained: set[int] = set()  # parameters left out with a reason of their own

        self._linear_site("embed.W_E", "W_E", None, model.embed, "weight", ("d_vocab", "d_model"),
                          ("d_vocab",), ("d_model",), TOKENS, "embed.hook_out", layout="same")
        if hasattr(model, "pos_embed"):
            self._linear_site("pos_embed.W_pos", "W_pos", None, model.pos_embed, "weight", ("n_ctx", "d_model"),
                              ("n_ctx",), ("d_model",), POSITIONS, "pos_embed.hook_out", layout="same")
        for i, block in enumerate(model.blocks):
            b = f"blocks.{i}"
            attn = getattr(block, "attn", None)
            for x in "qkv":
                comp = getattr(attn, x, None) if attn is not None else None
                if comp is None:
                    continue
                X = x.upper()
                native = self._native(comp)
                weight = getattr(native, "weight", None)
                if isinstance(weight, torch.Tensor) and weight.numel() != h * dh * cfg.d_model:
                    reason = gqa_reason(weight.numel() // (dh * cfg.d_model), h)
                    self.unsupported[f"{b}.attn.W_{X}"] = reason
                    explained.add(id(weight))
                    if isinstance(getattr(native, "bias", None), nn.Parameter):  # a bias-free model has no b_K
                        self.unsupported[f"{b}.attn.b_{X}"] = reason
                        explained.add(id(native.bias))
                    continue
                self._linear_site(f"{b}.attn.W_{X}", f"W_{X}", i, comp, "weight", ("head", "d_model", "d_head"),
                                  ("d_model",), ("head", "d_head"), f"{b}.attn.{x}.hook_in", f"{b}.attn.{x}.hook_out",
                                  layout="split_out", heads=(h, dh))
                self._linear_site(f"{b}.attn.b_{X}", f"b_{X}", i, comp, "bias", ("head", "d_head"), (),
                                  ("head", "d_head"), None, f"{b}.attn.{x}.hook_out", layout="split_bias", heads=(h, dh))
            qkv = getattr(attn, "qkv", None) if attn is not None else None
            if isinstance(qkv, nn.Module) and all(f"{b}.attn.W_{X}" in self.sites for X in "QKV"):
                # a fused qkv the bridge splits into q, k and v: their source, not read again
                # (NeoX, BLOOM, GPT-2 in compatibility mode: a copy whose gradient is None; GPT-2
                # otherwise: W_Q/W_K/W_V are views of it)
                fused = {id(p) for p in self._native(qkv).parameters(recurse=False)}
                explained.update(fused)
                self.unread.update(fused)
            o = getattr(attn, "o", None) if attn is not None else None
            if o is not None:
                self._linear_site(f"{b}.attn.W_O", "W_O", i, o, "weight", ("head", "d_head", "d_model"),
                                  ("head", "d_head"), ("d_model",), f"{b}.attn.o.hook_in", f"{b}.attn.o.hook_out",
                                  layout="split_in", heads=(h, dh))
                self._linear_site(f"{b}.attn.b_O", "b_O", i, o, "bias", ("d_model",), (), ("d_model",), None,
                                  f"{b}.attn.o.hook_out", layout="same")
            mlp = getattr(block, "mlp", None)
            if _computes_with_copies(mlp):
                self._copies.append(mlp)
            for attr, tl, modes in (("in", "W_in", ("d_model", "d_mlp")), ("gate", "W_gate", ("d_model", "d_mlp")),
                                    ("out", "W_out", ("d_mlp", "d_model"))):
                comp = getattr(mlp, attr, None) if mlp is not None else None
                if comp is None or not isinstance(comp, nn.Module):
                    continue
                # a gated MLP in compatibility mode runs gate and in functionally, so their own
                # hook_in never fires; both read the MLP's input
                gated_input = attr in ("in", "gate") and isinstance(getattr(mlp, "gate", None), nn.Module)
                self._linear_site(f"{b}.mlp.{tl}", tl, i, comp, "weight", modes, modes[:1], modes[1:],
                                  f"{b}.mlp.hook_in" if gated_input else f"{b}.mlp.{attr}.hook_in",
                                  f"{b}.mlp.{attr}.hook_out", layout="linear")
                bias_tl = "b_" + tl[2:]
                self._linear_site(f"{b}.mlp.{bias_tl}", bias_tl, i, comp, "bias", modes[1:], (), modes[1:], None,
                                  f"{b}.mlp.{attr}.hook_out", layout="same")
            for ln in ("ln1", "ln2"):
                comp = getattr(block, ln, None)
                if comp is not None:
                    self._norm_sites(f"{b}.{ln}", i, comp)
        if hasattr(model, "ln_final"):
            self._norm_sites("ln_final", None, model.ln_final)
        self._linear_site("unembed.W_U", "W_U", None, model.unembed, "weight", ("d_model", "d_vocab"),
                          ("d_model",), ("d_vocab",), "unembed.hook_in", "unembed.hook_out", layout="linear")
        self._linear_site("unembed.b_U", "b_U", None, model.unembed, "bias", ("d_vocab",), (), ("d_vocab",), None,
                          "unembed.hook_out", layout="same")
        self._note_without_site(explained)
        self._check_against_bridge_views()

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """As ``Adapter.session``; TransformerLens 3.x's compatibility-mode gated MLPs also run on
        their parameters rather than the ``_processed_W_*`` copies (the same values, the same
        logits), so that substituting a parameter, as the exact engine and a perturbed forward
        do, reaches the output."""
        saved = [(m, m._use_processed_weights) for m in self._copies]
        with super().session():
            try:
                for m, _ in saved:
                    m._use_processed_weights = False
                yield
            finally:
                for m, flag in saved:
                    m._use_processed_weights = flag

    # --- construction helpers ------------------------------------------------------------
    def _native(self, comp: nn.Module) -> nn.Module:
        return getattr(comp, "original_component", None) or getattr(comp, "_original_component", None) or comp

    def _linear_site(self, name, kind, layer, comp, attr, modes, in_modes, out_modes, input, output, layout,
                     heads: Optional[tuple[int, int]] = None):
        native = self._native(comp)
        param = getattr(native, attr, None)
        conv = _is_conv1d(native)
        to_tl, to_nat = _layout(layout, conv, heads)
        if not isinstance(param, nn.Parameter):
            if isinstance(native._buffers.get(attr), torch.Tensor):
                self._buffer_weight(name, native, attr, to_tl)
            return
        shape = tuple(to_tl(param.detach()).shape)
        fast = all(k in (None, TOKENS, POSITIONS) or k in self._hooks for k in (input, output))
        self.sites[name] = Site(name, kind, layer, modes, shape, in_modes, out_modes,
                                input if fast else None, output if fast else None)
        self._param_path[name] = f"{self._paths[id(native)]}.{attr}"
        self._from_native[name] = to_tl
        self._to_native[name] = to_nat
        if fast:
            for key in (input, output):
                if key not in (None, TOKENS, POSITIONS):
                    self._capture[key] = (self._hooks[key], "out")

    def _buffer_weight(self, name: str, native: nn.Module, attr: str, to_tl: Callable) -> None:
        """A weight the module keeps in a buffer (TransformerLens 4's compatibility mode folds the
        unembedding bias into one): no site, as l3d_lens decomposes parameters, but a selector
        that covers it warns that it is left out, and the fingerprint of the other parameters
        holds it under its TransformerLens name. A bias of zeros (the bridge's stand-in where the
        checkpoint has none) counts as none."""
        buffer = native._buffers[attr]
        if not buffer.is_floating_point() or zero_bias(attr, buffer):
            return
        self._in_buffers[name] = (f"{self._paths[id(native)]}.{attr}", to_tl)
        self.unsupported[name] = IN_BUFFER

    def _norm_sites(self, prefix: str, layer: Optional[int], comp: nn.Module) -> None:
        normalized = f"{prefix}.hook_normalized"
        self._linear_site(f"{prefix}.w", "ln_w", layer, comp, "weight", ("d_model",), ("d_model",), ("d_model",),
                          normalized, f"{prefix}.hook_out", layout="same")
        self._linear_site(f"{prefix}.b", "ln_b", layer, comp, "bias", ("d_model",), (), ("d_model",), None,
                          f"{prefix}.hook_out", layout="same")

    def _check_against_bridge_views(self) -> None:
        """Compare our layout conversion with the bridge's own W_Q/W_O/W_in views."""
        for name, site in self.sites.items():
            if site.layer is None or site.kind not in ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out"):
                continue
            parent = self.model.blocks[site.layer].attn if site.kind.startswith("W_") and site.kind[2] in "QKVO" \
                else self.model.blocks[site.layer].mlp
            try:
                view = getattr(parent, site.kind)
            except Exception:
                continue
            if isinstance(view, torch.Tensor) and view.shape == self.weight(name).shape:
                if not torch.equal(view.detach(), self.weight(name)):
                    raise RuntimeError(f"l3d_lens: layout conversion of {name} disagrees with the bridge's own view")

    # --- description -----------------------------------------------------------------------


def _layout(layout: str, conv: bool, heads: Optional[tuple[int, int]]) -> tuple[Callable, Callable]:
    """(native -> TL, TL -> native) for one parameter; ``conv``: HF Conv1D stores [in, out]."""
    if layout == "same":
        return identity, identity
    if layout == "linear":  # TL [in, out]; Linear [out, in]
        if conv:
            return identity, identity
        return (lambda t: t.T), (lambda t: t.T)
    h, dh = heads
    if layout == "split_bias":  # TL [h, d_head]; native [h*d_head]
        return (lambda t: t.reshape(h, dh)), (lambda t: t.reshape(h * dh))
    if layout == "split_out":  # TL [h, d_model, d_head]; Linear [h*d_head, d_model]
        if conv:
            return (lambda t: t.reshape(t.shape[0], h, dh).permute(1, 0, 2)), \
                (lambda t: t.permute(1, 0, 2).reshape(t.shape[1], h * dh))
        return (lambda t: t.reshape(h, dh, t.shape[-1]).permute(0, 2, 1)), \
            (lambda t: t.permute(0, 2, 1).reshape(h * dh, t.shape[1]))
    if layout == "split_in":  # TL [h, d_head, d_model]; Linear [d_model, h*d_head]
        if conv:
            return (lambda t: t.reshape(h, dh, t.shape[-1])), (lambda t: t.reshape(h * dh, t.shape[-1]))
        return (lambda t: t.T.reshape(h, dh, t.shape[0])), (lambda t: t.reshape(h * dh, t.shape[-1]).T)
    raise ValueError(layout)
