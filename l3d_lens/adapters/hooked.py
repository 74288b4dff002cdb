"""Adapter for TransformerLens 2.x/3.x ``HookedTransformer``: its Parameters already are the
TransformerLens-layout weights, so names map one to one and no layout change is needed."""

from __future__ import annotations

from torch import nn

from .base import POSITIONS, TOKENS, Site, TransformerLensAdapter, gqa_reason, identity


class HookedAdapter(TransformerLensAdapter):
    kind = "hooked_transformer"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = model.cfg
        params = dict(model.named_parameters())
        explained: set[int] = set()  # parameters left out with a reason of their own
        self._layout = self._layout_flags()
        fast_qkv = not (self._layout["use_split_qkv_input"] or self._layout["use_attn_in"])
        def add(name, kind, layer, modes, in_modes=(), out_modes=(), input=None, output=None, fast=True, param=None):
            """Site ``name`` for the Parameter at path ``param`` (default: ``name`` itself)."""
            param = param or name
            if param not in params:
                return
            shape = tuple(params[param].shape)
            self.sites[name] = Site(name, kind, layer, modes, shape, in_modes, out_modes,
                                    input if fast else None, output if fast else None)
            self._param_path[name] = param
            self._to_native[name] = identity
            self._from_native[name] = identity
            for key in (input, output):
                if fast and key is not None and key not in (TOKENS, POSITIONS) and key not in self._capture:
                    self._capture[key] = (model.get_submodule(key), "out")

        # with post_embedding_ln, hook_embed follows the embedding's LayerNorm: W_E's own output
        # is not exposed there
        add("embed.W_E", "W_E", None, ("d_vocab", "d_model"), ("d_vocab",), ("d_model",), TOKENS, "hook_embed",
            fast=not getattr(cfg, "post_embedding_ln", False))
        positions = getattr(cfg, "positional_embedding_type", "standard")
        if positions in ("standard", "shortformer"):
            add("pos_embed.W_pos", "W_pos", None, ("n_ctx", "d_model"), ("n_ctx",), ("d_model",), POSITIONS,
                "hook_pos_embed")
        elif "pos_embed.W_pos" in params:
            explained.add(id(params["pos_embed.W_pos"]))
            self.unsupported["pos_embed.W_pos"] = (f"unused: positional_embedding_type={positions!r} never reads "
                                                   f"the learned position embedding")
        # TransformerLens's gated MLP with a LayerNorm activation (solu_ln) computes ln(act(pre))
        # and never reads W_in or b_in
        ln_gated = getattr(cfg, "gated_mlp", False) and str(getattr(cfg, "act_fn", "")).endswith("_ln")
        for i in range(cfg.n_layers):
            b = f"blocks.{i}"
            # Q/K/V and MLP inputs are read where the block hands them to the module (attention's
            # query_input/key_input/value_input keywords, the MLP's argument), not at ln1/ln2: a
            # shortformer adds the positions to ln1's output for Q and K, and post-norm blocks
            # (OLMo 2/3) feed the raw residual; outputs likewise at the module, before any norm
            for x, kw in zip("qkv", ("query_input", "key_input", "value_input")):
                self._capture[f"{b}.attn:{x}_input"] = (model.get_submodule(f"{b}.attn"), kw)
            if hasattr(model.blocks[i], "mlp"):
                self._capture[f"{b}.mlp:in"] = (model.get_submodule(f"{b}.mlp"), "in")
            for ln, out in (("ln1", f"{b}.ln1"), ("ln2", f"{b}.ln2")):
                add(f"{b}.{ln}.w", "ln_w", i, ("d_model",), ("d_model",), ("d_model",), f"{b}.{ln}.hook_normalized", out)
                add(f"{b}.{ln}.b", "ln_b", i, ("d_model",), (), ("d_model",), None, out)
            for x in "QKV":
                # GroupedQueryAttention (built whenever cfg.n_key_value_heads is set) keeps K and V
                # in _W_K/_b_K/... per key/value head: with fewer of them than query heads they
                # are shared and left out; with as many, they are per-head weights like W_Q, and
                # hook_k/hook_v carry every head
                own = f"{b}.attn._" if f"{b}.attn._W_{x}" in params else f"{b}.attn."
                n_kv = params[f"{own}W_{x}"].shape[0] if f"{own}W_{x}" in params else cfg.n_heads
                if n_kv < cfg.n_heads:
                    reason = gqa_reason(n_kv, cfg.n_heads)
                    self.unsupported.update({f"{b}.attn.W_{x}": reason, f"{b}.attn.b_{x}": reason})
                    explained.update(id(params[n]) for n in (f"{own}W_{x}", f"{own}b_{x}") if n in params)
                    continue
                hook = f"{b}.attn.hook_{x.lower()}"
                add(f"{b}.attn.W_{x}", f"W_{x}", i, ("head", "d_model", "d_head"), ("d_model",), ("head", "d_head"),
                    f"{b}.attn:{x.lower()}_input", hook, fast_qkv, param=f"{own}W_{x}")
                add(f"{b}.attn.b_{x}", f"b_{x}", i, ("head", "d_head"), (), ("head", "d_head"), None, hook,
                    param=f"{own}b_{x}")
            # outputs at the attention / MLP module, before any norm the block applies to them
            add(f"{b}.attn.W_O", "W_O", i, ("head", "d_head", "d_model"), ("head", "d_head"), ("d_model",),
                f"{b}.attn.hook_z", f"{b}.attn")
            add(f"{b}.attn.b_O", "b_O", i, ("d_model",), (), ("d_model",), None, f"{b}.attn")
            gated = getattr(cfg, "gated_mlp", False)
            for name in (f"{b}.mlp.W_in", f"{b}.mlp.b_in") if ln_gated else ():
                if name in params:
                    self.unsupported[name] = (f"unused: TransformerLens's gated MLP with act_fn={cfg.act_fn!r} "
                                              f"computes ln(act(pre)) and never reads it")
                    explained.add(id(params.pop(name)))  # so add() skips it
            add(f"{b}.mlp.W_in", "W_in", i, ("d_model", "d_mlp"), ("d_model",), ("d_mlp",), f"{b}.mlp:in",
                f"{b}.mlp.hook_pre_linear" if gated else f"{b}.mlp.hook_pre")
            add(f"{b}.mlp.W_gate", "W_gate", i, ("d_model", "d_mlp"), ("d_model",), ("d_mlp",), f"{b}.mlp:in",
                f"{b}.mlp.hook_pre")
            # a gated MLP adds b_in after act(pre) * pre_linear: its gradient is the one at hook_post
            add(f"{b}.mlp.b_in", "b_in", i, ("d_mlp",), (), ("d_mlp",), None,
                f"{b}.mlp.hook_post" if gated else f"{b}.mlp.hook_pre")
            add(f"{b}.mlp.W_out", "W_out", i, ("d_mlp", "d_model"), ("d_mlp",), ("d_model",), f"{b}.mlp.hook_post",
                f"{b}.mlp")
            add(f"{b}.mlp.b_out", "b_out", i, ("d_model",), (), ("d_model",), None, f"{b}.mlp")
        add("ln_final.w", "ln_w", None, ("d_model",), ("d_model",), ("d_model",), "ln_final.hook_normalized", "ln_final")
        add("ln_final.b", "ln_b", None, ("d_model",), (), ("d_model",), None, "ln_final")
        add("unembed.W_U", "W_U", None, ("d_model", "d_vocab"), ("d_model",), ("d_vocab",), "unembed.hook_in",
            "unembed.hook_out")
        add("unembed.b_U", "b_U", None, ("d_vocab",), (), ("d_vocab",), None, "unembed.hook_out")
        self._note_without_site(explained)

    def _layout_flags(self) -> dict[str, bool]:
        return {k: bool(getattr(self.model.cfg, k, False)) for k in ("use_split_qkv_input", "use_attn_in")}

    def check_layout(self) -> None:
        changed = {k: v for k, v in self._layout_flags().items() if v != self._layout[k]}
        if changed:
            raise ValueError(f"the model's cfg changed since this decomposition read it: "
                             f"{', '.join(f'{k}={v} (was {self._layout[k]})' for k, v in changed.items())}; set it "
                             f"back (e.g. model.set_{next(iter(changed))}({self._layout[next(iter(changed))]})) "
                             f"or decompose again")
