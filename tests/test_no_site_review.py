"""Review fix: a selector spanning a parameter no site exposes (QK-norm and post-norm scales,
an MLP's own LayerNorm, a post-embedding LayerNorm, MoE experts) decomposed less than it named,
silently; it now warns that it leaves them out (and names them when nothing else matched), as it
already did for grouped-query K/V. A fused qkv that a bridge splits into q, k and v (GPT-2:
views of it; NeoX: a copy the forward never reads) is not such a parameter."""

from __future__ import annotations

import warnings

import pytest
import torch

import l3d_lens
from l3d_lens.adapters import make_adapter
from l3d_lens.decomposition import build_task

from .helpers import HAS_HOOKED, hf_bridge, tiny_lm

needs_hooked = pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer was removed in TransformerLens 4")
torch.set_num_threads(1)


def hooked(**kw):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    base = dict(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=24, d_vocab=20, n_ctx=8, act_fn="gelu", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HookedTransformer(HookedTransformerConfig(**{**base, **kw}))


def left_out(model, components, **cfg) -> tuple[list[str], list[str]]:
    """(the 'leaves out' warnings, the names selected) of build_task."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = build_task(model, l3d_lens.L3DConfig(components=components, **cfg))
    return [str(w.message) for w in caught if "leaves out" in str(w.message)], [s.name for s in task.selected]


@needs_hooked
@pytest.mark.parametrize("kw, selector, names", [
    (dict(use_qk_norm=True, normalization_type="RMS"), "blocks.0.attn",
     "blocks.0.attn.q_norm.w, blocks.0.attn.k_norm.w"),
    (dict(use_normalization_before_and_after=True, normalization_type="RMS"), "blocks.0",
     "blocks.0.ln1_post.w, blocks.0.ln2_post.w"),
    (dict(act_fn="solu_ln"), "blocks.0.mlp", "blocks.0.mlp.ln.w, blocks.0.mlp.ln.b"),
    (dict(post_embedding_ln=True), "embed", "embed.ln.w, embed.ln.b"),
])
def test_a_selector_warns_of_parameters_without_a_site(kw, selector, names):
    warned, selected = left_out(hooked(**kw), selector, engine="exact")
    assert warned == [f"selector {selector!r} leaves out {names}: l3d_lens has no decomposition site for these "
                      f"(it decomposes W_E, W_pos, W_Q/K/V/O, W_in/W_gate/W_out, W_U, their biases and the "
                      f"ln1/ln2/ln_final scales and biases; not QK-norm or post-norm scales, an MLP's own "
                      f"LayerNorm or MoE experts)"]
    assert selected  # the rest is still decomposed


@needs_hooked
def test_biases_left_out_are_not_named_without_include_biases():
    warned, _ = left_out(hooked(act_fn="solu_ln"), "blocks.0.mlp", include_biases=False)
    assert warned[0].startswith("selector 'blocks.0.mlp' leaves out blocks.0.mlp.ln.w: ")


@needs_hooked
def test_naming_such_a_parameter_says_why_it_cannot_be_decomposed():
    with pytest.raises(ValueError, match=r"selector 'blocks.0.attn.q_norm': blocks.0.attn.q_norm.w cannot be "
                                         r"decomposed: l3d_lens has no decomposition site"):
        build_task(hooked(use_qk_norm=True, normalization_type="RMS"),
                   l3d_lens.L3DConfig(components=["blocks.0.attn.q_norm"]))


@needs_hooked
def test_moe_experts_are_named_with_a_count():
    model = hooked(num_experts=4, experts_per_token=2, act_fn="silu", gated_mlp=True, dtype=torch.float32)
    warned, selected = left_out(model, "blocks.0")
    assert len(warned) == 1 and warned[0].startswith("selector 'blocks.0' leaves out blocks.0.mlp.")
    assert " and 5 more: " in warned[0]  # 12 expert weights and the router, 8 of them named
    assert "blocks.0.attn.W_Q" in selected


@pytest.mark.parametrize("kind", ["hooked", "bridge"])
def test_the_standard_architecture_leaves_nothing_out(kind):
    if kind == "hooked" and not HAS_HOOKED:
        pytest.skip("HookedTransformer was removed in TransformerLens 4")
    model = tiny_lm(kind)
    assert make_adapter(model).unsupported == {}
    assert left_out(model, "blocks.0")[0] == []


def test_a_gpt2_bridge_fused_qkv_is_covered(tmp_path):
    """W_Q, W_K and W_V of a GPT-2 bridge are views of its fused qkv weight."""
    transformers = pytest.importorskip("transformers")
    from transformer_lens.model_bridge import TransformerBridge

    from .helpers import write_tiny_gpt2

    folder = write_tiny_gpt2(tmp_path / "gpt2", model=True)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, dtype=torch.float32,
                                                 tokenizer=transformers.AutoTokenizer.from_pretrained(folder))
    assert make_adapter(bridge).unsupported == {}


def test_a_neox_bridge_fused_qkv_is_not_left_out(tmp_path):
    """A NeoX bridge splits attention.query_key_value into q, k and v copies; the forward never
    reads the fused weight again (its gradient stays None), so no selector leaves it out."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoXConfig(hidden_size=16, num_attention_heads=2, intermediate_size=24, num_hidden_layers=1,
                                     vocab_size=20, max_position_embeddings=8, rotary_pct=0.5,
                                     tie_word_embeddings=False)
    bridge = hf_bridge(tmp_path, transformers.GPTNeoXForCausalLM, cfg)
    qkv = bridge.blocks[0].attn.qkv
    weight = getattr(qkv, "original_component", None) or qkv._original_component
    bridge(torch.randint(0, 20, (1, 4))).sum().backward()
    assert weight.weight.grad is None  # what makes leaving it out of the warning right
    assert make_adapter(bridge).unsupported == {}


def test_a_qwen3_bridge_names_its_qk_norm_as_a_selector_would(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3Config"):
        pytest.skip("this transformers has no Qwen3")
    cfg = transformers.Qwen3Config(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                   intermediate_size=24, num_hidden_layers=1, vocab_size=20,
                                   max_position_embeddings=8, tie_word_embeddings=False)
    bridge = hf_bridge(tmp_path, transformers.Qwen3ForCausalLM, cfg)
    warned, _ = left_out(bridge, "blocks.0.attn")
    assert warned and warned[0].startswith(
        "selector 'blocks.0.attn' leaves out blocks.0.attn.q_norm.weight, blocks.0.attn.k_norm.weight: ")
