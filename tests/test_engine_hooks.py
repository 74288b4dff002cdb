"""The model as the user runs it: their own TransformerLens hooks, and configurations whose
weights are read elsewhere or not at all. Both engines against the torch.func oracle
(tests/reference.py, which runs the model with its forward hooks), tolerance as in
test_exactness (1e-5 relative).

The fast engine used to read a weight's output after the user's hooks on that hook point
(hook_q x 2 gave coefficients 43% off), to start token mode's backward at the unembedding's
input when a hook there mixed positions, and to read W_E's output after post_embedding_ln.
"""

from __future__ import annotations

import pytest
import torch

import l3d_lens
from l3d_lens.decomposition import build_task

from .helpers import HAS_HOOKED, TL_VERSION, tiny_lm, tokens
from .test_exactness import check, setup

torch.set_num_threads(1)


def _double(t, hook):
    return t * 2


def _mix_positions(t, hook):  # each position's logits also carry the previous position's
    out = t.clone()
    out[:, 1:] = t[:, 1:] + 0.7 * t[:, :-1]
    return out


def _zero_in_place(t, hook):  # as in the TransformerLens tutorials: edit, return nothing
    t[..., :3] = 0


def _recorded(model, name, x):
    """A patch from a cache: ``name``'s activation on the first of other inputs, a constant
    hook that puts it in every row (a row's value cannot depend on the batch: the oracle runs
    one sample at a time)."""
    seen = []
    model.add_hook(name, lambda t, hook: seen.append(t.detach().clone()))
    with torch.no_grad():
        model(x)
    model.reset_hooks()
    return lambda t, hook: seen[0][:1].expand_as(t)


CASES = {
    "hook_pre_x2": (["blocks.1.mlp"], lambda m: [("blocks.1.mlp.hook_pre", _double)]),
    "hook_q_x2": (["blocks.0.attn"], lambda m: [("blocks.0.attn.hook_q", _double)]),
    "hook_v_patched": (["blocks.1.attn"], lambda m: [
        ("blocks.1.attn.hook_v", _recorded(m, "blocks.1.attn.hook_v", tokens(3, 5, seed=7)))]),
    "embeddings": (["embed", "pos_embed", "blocks.0.attn.W_V"],
                   lambda m: [("hook_embed", _double), ("hook_pos_embed", lambda t, hook: 3 * t)]),
    "logits_mix_positions": (["blocks.0.attn", "blocks.1.mlp", "unembed"],
                             lambda m: [("unembed.hook_out", _mix_positions)]),
    "in_place": (["blocks.1.mlp", "blocks.0.attn"], lambda m: [("blocks.1.mlp.hook_pre", _zero_in_place),
                                                             ("blocks.0.attn.hook_v", _zero_in_place)]),
}


@pytest.mark.parametrize("engine", ["fast", "exact"])
@pytest.mark.parametrize("sample", ["token", "sequence"])
@pytest.mark.parametrize("case", list(CASES))
def test_user_forward_hooks_are_part_of_the_model(lm_kind, engine, sample, case):
    model = tiny_lm(lm_kind)
    components, hooks = CASES[case]
    x, ref = tokens(3, 5, seed=1), tokens(3, 5, seed=2)
    for name, fn in hooks(model):
        model.add_hook(name, fn)
    try:
        task, f = setup(model, components, sample, engine)
        check(task, f, model, x, ref)
    finally:
        model.reset_hooks(including_permanent=True)


def test_an_in_place_hook_on_a_frozen_model(lm_kind):
    """With requires_grad off, the captured output is a leaf: an in-place hook on it raised
    "a view of a leaf Variable ... in-place operation"."""
    model = tiny_lm(lm_kind).requires_grad_(False)
    model.add_hook("blocks.1.mlp.hook_pre", _zero_in_place)
    try:
        task, f = setup(model, ["blocks.1.mlp"], "token", "fast")
        check(task, f, model, tokens(3, 5, seed=1), tokens(3, 5, seed=2))
    finally:
        model.reset_hooks()


def test_a_patched_activation_leaves_its_weight_no_gradient():
    """hook_v replaced by cached values: W_V and b_V do not reach the output, so their gradient
    is exactly zero (the fast engine reported ||g||^2 of 0.04-2.5)."""
    model = tiny_lm("bridge" if not HAS_HOOKED else "hooked")
    model.add_hook("blocks.1.attn.hook_v", _recorded(model, "blocks.1.attn.hook_v", tokens(3, 5, seed=7)))
    try:
        cfg = l3d_lens.L3DConfig(components=["blocks.1.attn.W_V", "blocks.1.attn.b_V"], n_subnetworks=2, rank=1,
                                 epochs=1, dtype="float64")
        dec = l3d_lens.decompose(model, tokens(4, 5), cfg, progress=False)
        assert torch.equal(dec.gradient_norms(tokens(3, 5, seed=1)), torch.zeros(15, dtype=torch.float64))
    finally:
        model.reset_hooks()


@pytest.mark.parametrize("engine", ["fast", "exact"])
def test_backward_hooks_are_refused(lm_kind, engine):
    """torch.func cannot run them (the exact engine failed with functorch's setup_context
    message) and one may change the gradients the fast engine reads."""
    model = tiny_lm(lm_kind)
    model.add_hook("blocks.0.hook_resid_post", lambda g, hook: None, dir="bwd")
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=2, rank=1, epochs=1, engine=engine)
    try:
        with pytest.raises(ValueError, match=r"the model has backward hooks on .*blocks.0.hook_(resid_post|out).*"
                                             r"model.reset_hooks\(including_permanent=True\)"):
            l3d_lens.decompose(model, tokens(4, 5), cfg, progress=False)
    finally:
        model.reset_hooks()
    l3d_lens.decompose(model, tokens(4, 5), cfg, progress=False)


# --- HookedTransformer configurations -----------------------------------------------------------

def _hooked(**kw):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    base = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=20, n_ctx=8, act_fn="gelu", seed=0,
                dtype=torch.float64, normalization_type="LN")
    model = HookedTransformer(HookedTransformerConfig(**{**base, **kw})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".b_" in n or n.endswith(".b"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    return model


hooked_only = pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer was removed in TransformerLens 4")


@hooked_only
def test_post_embedding_ln_keeps_w_e_to_the_exact_engine():
    """hook_embed follows the embedding's LayerNorm there: the fast engine read W_E's output
    after it (||g||^2 97% off); it now names engine='exact', which matches the oracle."""
    model = _hooked(post_embedding_ln=True)
    x, ref = tokens(3, 5, seed=1), tokens(3, 5, seed=2)
    with pytest.raises(ValueError, match=r"engine='fast' cannot decompose \['embed.W_E'\].*use engine='exact'"):
        setup(model, ["embed", "blocks.0.attn"], "token", "fast")
    task, f = setup(model, ["embed", "blocks.0.attn"], "token", "exact")
    check(task, f, model, x, ref)


@hooked_only
@pytest.mark.parametrize("engine", ["fast", "exact"])
def test_gated_solu_ln_mlp_leaves_out_the_weights_it_never_reads(engine):
    """TransformerLens's gated MLP with act_fn='solu_ln' computes ln(act(pre)): W_in and b_in
    are unused. The fast engine gave b_in a gradient (the true one is 0) and failed on W_in."""
    model = _hooked(gated_mlp=True, act_fn="solu_ln")
    x, ref = tokens(3, 5, seed=1), tokens(3, 5, seed=2)
    with pytest.warns(UserWarning, match=r"'blocks.1.mlp' leaves out blocks.1.mlp.W_in, blocks.1.mlp.b_in: unused"):
        task, f = setup(model, ["blocks.1.mlp"], "token", engine)
    assert {s.name for s in task.selected} == {"blocks.1.mlp.W_gate", "blocks.1.mlp.W_out", "blocks.1.mlp.b_out"}
    check(task, f, model, x, ref)
    with pytest.raises(ValueError, match=r"blocks.1.mlp.b_in cannot be decomposed: unused"):
        setup(model, ["blocks.1.mlp.b_in"], "token", engine)


@hooked_only
def test_alibi_models_leave_out_the_unused_position_embedding():
    model = _hooked(positional_embedding_type="alibi")
    with pytest.raises(ValueError, match=r"pos_embed.W_pos cannot be decomposed: unused: positional_embedding_type="
                                         r"'alibi'"):
        build_task(model, l3d_lens.L3DConfig(components="pos_embed"))
    x, ref = tokens(3, 5, seed=1), tokens(3, 5, seed=2)
    with pytest.warns(UserWarning, match="leaves out pos_embed.W_pos"):
        task, f = setup(model, ["*"], "token", "fast")
    check(task, f, model, x, ref)


@hooked_only
def test_split_qkv_input_with_grouped_query_attention_is_named_a_shared_layer():
    """ln1 then runs on [b, p, 2, d] for Q and [b, p, 1, d] for K and V: the fast engine's
    same-input check broadcast one against the other and failed later in torch.stack."""
    model = _hooked(n_key_value_heads=1, use_split_qkv_input=True)
    x, ref = tokens(3, 5, seed=1), tokens(3, 5, seed=2)
    task, f = setup(model, ["blocks.0.ln1"], "token", "fast")
    with pytest.raises(ValueError, match=r"blocks.0.ln1.hook_normalized: the model calls that layer more than once"):
        check(task, f, model, x, ref)
    task, f = setup(model, ["blocks.0.ln1"], "token", "exact")
    check(task, f, model, x, ref)


@hooked_only
def test_a_reconfigured_model_is_named():
    """set_use_split_qkv_input after decompose: the adapter had read the old layout, and later
    calls failed inside an einsum."""
    model = _hooked()
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=2, rank=1, epochs=1, dtype="float64")
    dec = l3d_lens.decompose(model, tokens(4, 5), cfg, progress=False)
    model.set_use_split_qkv_input(True)
    with pytest.raises(ValueError, match=r"cfg changed since this decomposition read it: use_split_qkv_input=True "
                                         r"\(was False\); set it back \(e.g. model.set_use_split_qkv_input\(False\)\)"):
        dec.coefficients(tokens(2, 5))
    model.set_use_split_qkv_input(False)
    assert dec.coefficients(tokens(2, 5)).shape == (10, 2)


# --- Hugging Face architectures through the bridge -----------------------------------------------

def _scale_native_embedding(model, factor):
    """Gemma's embedding multiplies by sqrt(d_model) inside the module whose output is
    embed.hook_out; a forward hook on the wrapped nn.Embedding does the same here."""
    native = getattr(model.embed, "original_component", None) or model.embed._original_component
    return native.register_forward_hook(lambda module, args, out: out * factor)


@pytest.mark.parametrize("kind", ["bridge", "bridge_compat"])
def test_a_scaled_embedding_is_left_to_the_exact_engine(kind):
    """The fast engine took embed.hook_out to be the row W_E[token]: on Gemma it was
    sqrt(d_model) times that, and W_E's ||g||^2 came out 1/d_model of the truth."""
    model = tiny_lm(kind)
    handle = _scale_native_embedding(model, 4.0)
    try:
        x, ref = tokens(3, 5, seed=1), tokens(3, 5, seed=2)
        task, f = setup(model, ["embed", "blocks.0.attn"], "token", "fast")
        with pytest.raises(ValueError, match=r"engine='fast' cannot decompose embed.W_E on this model: its output "
                                             r"\(embed.hook_out\) is not the rows of embed.W_E its input picks"):
            check(task, f, model, x, ref)
        task, f = setup(model, ["embed", "pos_embed", "blocks.0.attn"], "token", "exact")
        check(task, f, model, x, ref)
        task, f = setup(model, ["pos_embed", "blocks.0.attn"], "token", "fast")  # W_pos is still its rows
        check(task, f, model, x, ref)
    finally:
        handle.remove()


def test_an_exact_engine_model_torch_func_cannot_run_is_named():
    """Bloom's GELU is an autograd.Function without setup_context: the exact engine failed with
    functorch's own message."""

    class OldStyleGelu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.nn.functional.gelu(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                return torch.autograd.grad(torch.nn.functional.gelu(x), x, g)[0]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 3).double()

        def forward(self, x):
            return self.fc2(OldStyleGelu.apply(self.fc1(x)))

    x = torch.rand(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = l3d_lens.L3DConfig(components=["fc1", "fc2"], n_subnetworks=2, rank=1, epochs=1, engine="exact")
    with pytest.raises(ValueError, match=r"engine='exact' cannot run this model: .*use engine='fast'"):
        l3d_lens.decompose(Net(), x, cfg, progress=False)
    l3d_lens.decompose(Net(), x, cfg.replace(engine="fast"), progress=False)


@pytest.mark.skipif(not TL_VERSION.startswith("3."), reason="TransformerLens 4's compatibility-mode gated MLP "
                                                             "computes with its parameters (checked by test_exactness)")
@pytest.mark.parametrize("engine", ["fast", "exact"])
def test_a_gated_mlp_that_computes_with_copies_is_decomposed_on_its_parameters(engine):
    """TransformerLens 3.x's compatibility-mode gated MLP runs on _processed_W_* copies: the exact
    engine substituted the unused parameters and returned zero gradients, silently. In a session
    the MLP runs on its parameters (same values, same logits), restored after. float32: this
    MLP fails on float64 in TransformerLens's own forward."""
    model = tiny_lm("bridge_compat", gated=True, dtype=torch.float32)
    mlps = [block.mlp for block in model.blocks]
    x, ref = tokens(3, 5, seed=1), tokens(3, 5, seed=2)
    with torch.no_grad():
        before = model(x)
    task, f = setup(model, ["blocks.0.mlp", "blocks.1.attn"], "token", engine)
    assert {"blocks.0.mlp.W_in", "blocks.0.mlp.W_gate", "blocks.0.mlp.W_out"} <= {s.name for s in task.selected}
    for m in mlps:  # the oracle differentiates the parameters: run it on them too
        m._use_processed_weights = False
    try:
        with torch.no_grad():
            assert torch.equal(model(x), before)
        from l3d_lens.decomposition import Decomposition

        from .reference import loss_and_coefficients, per_sample_grads
        from .test_exactness import library, rel
        st, _, _ = library(task, f, x, ref)
        g = {k: v.double() for k, v in per_sample_grads(model, [s.name for s in task.selected], x, ref, "token", -1,
                                                        task.cfg.divergence).items()}
        dec = Decomposition(task, f, [])
        coef, _ = loss_and_coefficients(g, dec.encoders(), dec.subnetworks(), task.cfg.top_k)
        gsq = sum(v.reshape(v.shape[0], -1).pow(2).sum(1) for v in g.values())
        assert rel(st.A, coef) < 1e-4 and rel(st.gsq, gsq) < 1e-4 and gsq.min() > 0  # float32 model
    finally:
        for m in mlps:
            m._use_processed_weights = True
    l3d_lens.decompose(model, x, l3d_lens.L3DConfig(components="blocks.0.mlp", n_subnetworks=2, rank=1, epochs=1,
                                                    engine=engine), progress=False)
    assert all(m._use_processed_weights for m in mlps)
