"""Grouped-query attention, as the adapters see it.

TransformerLens 3.x builds a GroupedQueryAttention whenever ``cfg.n_key_value_heads`` is set,
even to n_heads (its Qwen2 / OLMoE / Olmo3 configs do): then K and V are plain per-head
weights (``attn._W_K`` [n_heads, d_model, d_head]) and are decomposed; with fewer key/value
heads they are refused, as before. A bias-free grouped-query model (a Hugging Face Llama with
attention_bias=False) names no b_K/b_V it does not have.

Gradients are compared with tests/reference.py's torch.func oracle on the model's own
Parameters, in float64: errors below 1e-9 of the largest value compared (the observed error is
round-off, about 1e-15; b_K's gradient vanishes analytically, so it is measured on that scale).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import l3d_lens
from l3d_lens.decomposition import Decomposition, build_task
from l3d_lens.engine import batch_stats
from l3d_lens.engine.exact import per_sample_gradients
from l3d_lens.subnetworks import init_factors, resolve_ranks

from .helpers import HAS_HOOKED, hf_bridge, tiny_lm, tokens
from .reference import loss_and_coefficients, per_sample_grads

RTOL = 1e-9
GQA_K = ("blocks.0.attn.W_K cannot be decomposed: grouped-query attention: 1 key/value heads shared by 2 query "
         "heads (l3d_lens decomposes Q, O and the MLPs of such models, not K and V)")
needs_hooked = pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer was removed in TransformerLens 4")


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def left_out(model, components) -> list[str]:
    """The 'leaves out' warnings build_task gives for ``components``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_task(model, l3d_lens.L3DConfig(components=components))
    return [str(w.message) for w in caught if "leaves out" in str(w.message)]


def selector_error(model, components) -> str:
    with pytest.raises(ValueError) as e:
        build_task(model, l3d_lens.L3DConfig(components=components))
    return str(e.value)


def oracle_grads(model, names, x, ref):
    """reference.per_sample_grads on the Parameters themselves: GroupedQueryAttention keeps
    W_K/b_K/W_V/b_V as attn._W_K/... (same layout), which the oracle reads by path."""
    paths = {n: re.sub(r"attn\.([Wb]_[KV])$", r"attn._\1", n) for n in names}
    g = per_sample_grads(model, list(paths.values()), x, ref, "token")
    return {n: g[p] for n, p in paths.items()}


@pytest.fixture(scope="module")
def equal_kv():
    """A float64 HookedTransformer with n_key_value_heads == n_heads == 2."""
    if not HAS_HOOKED:
        pytest.skip("HookedTransformer was removed in TransformerLens 4")
    model = tiny_lm("hooked", n_key_value_heads=2)
    attn = model.blocks[0].attn
    assert type(attn).__name__ == "GroupedQueryAttention" and tuple(attn._W_K.shape) == (2, 16, 8)
    return model


@needs_hooked
@pytest.mark.parametrize("engine", ["fast", "exact"])
def test_hooked_equal_kv_heads_decompose_k_and_v_like_the_oracle(equal_kv, engine):
    """As many key/value heads as query heads: K and V (backed by attn._W_K/_b_K/...) are
    selected with no warning, and both engines' coefficients and ||g||^2 (the exact engine's
    per-sample gradients too) match the torch.func oracle."""
    model = equal_kv
    components = ["blocks.0.attn", "blocks.1.attn.W_V"]
    assert left_out(model, components) == []
    cfg = l3d_lens.L3DConfig(components=components, n_subnetworks=4, rank=2, sample="token", reference="paired",
                             engine=engine, dtype="float64", top_k=0.3)
    task = build_task(model, cfg)
    names = [s.name for s in task.selected]
    assert {"blocks.0.attn.W_K", "blocks.0.attn.b_K", "blocks.0.attn.W_V", "blocks.0.attn.b_V",
            "blocks.1.attn.W_V"} <= set(names)
    assert task.adapter.native_parameter("blocks.0.attn.W_K") is model.blocks[0].attn._W_K
    x, ref = tokens(3, 5, seed=1), tokens(3, 5, seed=2)
    g = oracle_grads(model, names, x, ref)
    if engine == "exact":
        mine = per_sample_gradients(task, x, None, ref)
        scale = max(v.abs().max().item() for v in g.values())  # b_K's gradient vanishes: round-off only
        for n in names:
            assert (mine[n] - g[n]).abs().max().item() <= RTOL * scale, n
    f = init_factors(task.selected, resolve_ranks(task.selected, cfg.rank), 4, torch.Generator().manual_seed(3),
                     torch.float64, torch.device("cpu"))
    st = batch_stats(task, f, x, None, ref)
    dec = Decomposition(task, f, [])
    coef, _ = loss_and_coefficients(g, dec.encoders(), dec.subnetworks(), cfg.top_k)
    gsq = sum(v.reshape(v.shape[0], -1).pow(2).sum(1) for v in g.values())
    assert rel(st.A, coef) < RTOL
    assert rel(st.gsq, gsq) < RTOL


@needs_hooked
def test_hooked_equal_kv_heads_intervention_on_w_k_restores_bit_for_bit(equal_kv):
    """An intervention on W_K edits attn._W_K inside the block (the output moves) and
    leaves every parameter bit-identical after."""
    model = equal_kv
    x = tokens(4, 5, seed=1)
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn.W_K", n_subnetworks=2, rank=1, epochs=1, batch_size=4)
    dec = l3d_lens.decompose(model, x, cfg, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    w_k = model.blocks[0].attn._W_K
    with torch.no_grad():
        base = model(x)
        with dec.intervene(subnetwork=0, delta=0.5):
            inside = model(x)
            edited = w_k.detach().clone()
    change = 0.5 * dec.subnetworks()["blocks.0.attn.W_K"][0].to(edited.dtype)
    assert torch.allclose(edited - before["blocks.0.attn._W_K"], change)
    assert (inside - base).abs().max() > 1e-6
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@needs_hooked
def test_hooked_grouped_query_attention_still_refuses_k_and_v():
    """Fewer key/value heads than query heads: K and V stay refused, with the same message."""
    model = tiny_lm("hooked", n_key_value_heads=1)
    assert selector_error(model, "blocks.0.attn.W_K") == f"selector 'blocks.0.attn.W_K': {GQA_K}"
    assert left_out(model, "blocks.0.attn") == [
        "selector 'blocks.0.attn' leaves out blocks.0.attn.W_K, blocks.0.attn.b_K, blocks.0.attn.W_V, "
        "blocks.0.attn.b_V: " + GQA_K.split(": ", 1)[1]]


def _bias_free_llama_bridge(tmp_path):
    """A 1-layer Hugging Face Llama bridge, 2 query heads, 1 key/value head, no biases."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=24, num_hidden_layers=1, vocab_size=20,
                                   max_position_embeddings=8, tie_word_embeddings=False, attention_bias=False)
    return hf_bridge(tmp_path, transformers.LlamaForCausalLM, cfg)


def test_bias_free_gqa_bridge_names_no_k_or_v_bias(tmp_path):
    """Without attention biases, the warning names W_K and W_V only, and b_K is a name that
    matches no weight, like b_Q (it used to give the grouped-query error)."""
    model = _bias_free_llama_bridge(tmp_path)
    assert left_out(model, "blocks.0.attn") == [
        "selector 'blocks.0.attn' leaves out blocks.0.attn.W_K, blocks.0.attn.W_V: " + GQA_K.split(": ", 1)[1]]
    for bias in ("b_Q", "b_K", "b_V"):
        assert selector_error(model, f"blocks.0.attn.{bias}").startswith(
            f"selector 'blocks.0.attn.{bias}' matches no weight; available: ")


def test_biased_gqa_bridge_still_refuses_b_k():
    """With attention biases (the native bridge has them), b_K keeps the grouped-query error."""
    model = tiny_lm("bridge", n_key_value_heads=1)
    assert selector_error(model, "blocks.0.attn.b_K") == (
        f"selector 'blocks.0.attn.b_K': {GQA_K.replace('W_K', 'b_K', 1)}")
