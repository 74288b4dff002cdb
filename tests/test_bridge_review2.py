"""Review fixes of a TransformerBridge's weights outside Parameters and of saving: a TransformerLens 4
compatibility-mode bridge keeps the folded unembedding bias in a buffer, which the 'unembed'
selector says it leaves out and the load check covers; a folded HookedTransformer's decomposition
loads into the compatibility-mode bridge of the same weights (its identity norms count as none,
its stale fused qkv is not read), while another model is still refused; saves of earlier
l3d_lens still load; Decomposition.save onto a file is a ValueError."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from l3d_lens import Decomposition, L3DConfig, decompose
from l3d_lens import io as l3d_io
from l3d_lens.decomposition import build_task

from .helpers import HAS_HOOKED, TL_VERSION, TinyMLP, as_earlier_save, tiny_lm, tokens

torch.set_num_threads(1)

buffer_b_U = pytest.mark.skipif(TL_VERSION.startswith("3."), reason="TransformerLens 3's bridge keeps b_U as a "
                                                                   "Parameter (a site); 4's keeps it in a buffer")
hooked_only = pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer was removed in TransformerLens 4")
REFUSED = "parameters outside the decomposed weights differ"
MLP_DATA = torch.rand(8, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def cfg(components, **kw):
    return L3DConfig(components=components, n_subnetworks=2, rank=1, epochs=1, batch_size=3, seed=0,
                     dtype=torch.float64, **kw)


def as_version_1(folder, model):
    """Rewrite a save's fingerprint of the other parameters as an l3d_lens before version 2 wrote it."""
    meta = json.loads((folder / "decomposition.json").read_text())
    task = build_task(model, L3DConfig.from_dict(meta["config"]), saved=True)
    meta["fingerprint"]["others_tl"] = l3d_io.others_sha256(task, 1)
    del meta["fingerprint"]["others_tl_version"]
    (folder / "decomposition.json").write_text(json.dumps(meta))
    as_earlier_save(folder)


def unembed_bias(bridge) -> torch.Tensor:
    return bridge.unembed.original_component.bias


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(a function booting a float64 TransformerBridge of a seeded 2-layer GPT-2 -> (bridge, the
    model's folder), tokens)."""
    transformers = pytest.importorskip("transformers")
    from transformer_lens.model_bridge import TransformerBridge

    from .helpers import write_tiny_gpt2

    folder = write_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), model=True)

    def boot():
        hf = transformers.GPT2LMHeadModel.from_pretrained(folder, torch_dtype=torch.float64).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, dtype=torch.float64,
                                                         tokenizer=transformers.AutoTokenizer.from_pretrained(folder))
            bridge.enable_compatibility_mode()
        return bridge.eval(), folder

    return boot, tokens(6, 8, d_vocab=256, seed=5)


# --- 1. the unembedding bias a TransformerLens 4 compatibility-mode bridge keeps in a buffer -------

@buffer_b_U
def test_the_unembed_selector_warns_that_it_leaves_out_a_buffer_b_U():
    model = tiny_lm("bridge_compat")
    assert not isinstance(unembed_bias(model), torch.nn.Parameter) and unembed_bias(model).any()
    with pytest.warns(UserWarning, match=r"selector 'unembed' leaves out unembed\.b_U: a buffer, not an nn\.Param"):
        dec = decompose(model, tokens(), cfg(["unembed"]), progress=False)
    assert dec.weight_names == ["unembed.W_U"]
    with pytest.raises(ValueError, match=r"unembed\.b_U cannot be decomposed: a buffer"):
        decompose(model, tokens(), cfg(["unembed.b_U"]), progress=False)


@buffer_b_U
def test_a_bridge_without_a_bias_does_not_warn_about_its_buffer_of_zeros():
    model = tiny_lm("bridge")  # TransformerLens 4 stands a buffer of zeros in for the missing b_U
    assert not unembed_bias(model).any()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert decompose(model, tokens(), cfg(["unembed"]), progress=False).weight_names == ["unembed.W_U"]
    assert not [w for w in record if "leaves out" in str(w.message)]


@buffer_b_U
def test_load_refuses_a_model_whose_buffer_b_U_differs(tmp_path):
    model = tiny_lm("bridge_compat")
    dec = decompose(model, tokens(), cfg(["blocks.0.attn"]), progress=False)
    dec.save(tmp_path / "d")
    Decomposition.load(tmp_path / "d", model)
    with torch.no_grad():
        unembed_bias(model).add_(0.5)  # another output bias: other gradients, other coefficients
    with pytest.raises(ValueError, match=REFUSED):
        Decomposition.load(tmp_path / "d", model)
    Decomposition.load(tmp_path / "d", model, check_weights=False)


# --- 2. identity norms and a stale fused qkv --------------------------------------------------------

def test_a_compat_bridges_unread_fused_qkv_is_not_checked_but_its_norms_are(gpt2, tmp_path):
    boot, x = gpt2
    bridge, _ = boot()
    dec = decompose(bridge, x, cfg(["blocks.1.attn"]), progress=False)
    dec.save(tmp_path / "d")
    qkv = bridge.blocks[0].attn.qkv.original_component
    with torch.no_grad():
        before = bridge(x)
        qkv.weight.mul_(2)  # a copy the compatibility-mode forward never reads
        assert torch.equal(bridge(x), before)
    loaded = Decomposition.load(tmp_path / "d", bridge)
    torch.testing.assert_close(loaded.coefficients(x), dec.coefficients(x), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        bridge.blocks[0].ln1.original_component.weight.mul_(1.5)  # was ones: no longer an identity
    with pytest.raises(ValueError, match=REFUSED):
        Decomposition.load(tmp_path / "d", bridge)


def test_a_save_of_version_1_still_loads_into_its_model_and_refuses_another(tmp_path):
    model = tiny_lm("bridge_compat")
    dec = decompose(model, tokens(), cfg(["blocks.1.attn"]), progress=False)
    dec.save(tmp_path / "d")
    as_version_1(tmp_path / "d", model)
    loaded = Decomposition.load(tmp_path / "d", model)
    assert all(torch.equal(loaded.factors[k], dec.factors[k]) for k in dec.factors)
    with torch.no_grad():
        model.blocks[0].attn.o.original_component.weight.mul_(1.5)
    with pytest.raises(ValueError, match=REFUSED):
        Decomposition.load(tmp_path / "d", model)


def folded_hooked(folder):
    """A HookedTransformer of the GPT-2 in ``folder``, processed as from_pretrained does (fold_ln,
    centred writing weights and unembedding, folded value biases), from a Hugging Face model of
    its own (a compatibility-mode bridge processes the one it wraps in place)."""
    from transformers import GPT2LMHeadModel
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict

    hf = GPT2LMHeadModel.from_pretrained(folder, torch_dtype=torch.float64).eval()
    c = get_pretrained_model_config(str(folder), fold_ln=True, dtype=torch.float64)
    model = HookedTransformer(c)
    model.load_and_process_state_dict(get_pretrained_state_dict(str(folder), c, hf, dtype=torch.float64), fold_ln=True,
                                      center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    return model.eval()


@hooked_only
@pytest.mark.parametrize("old_save", [False, True], ids=["save", "save_of_version_1"])
def test_a_folded_hooked_transformers_decomposition_loads_into_its_compat_bridge(gpt2, tmp_path, old_save):
    boot, x = gpt2
    bridge, folder = boot()
    hooked = folded_hooked(folder)
    with torch.no_grad():
        torch.testing.assert_close(hooked(x), bridge(x), rtol=0, atol=1e-12)
    dec = decompose(hooked, x, cfg(["blocks.0.attn"]), progress=False)
    dec.save(tmp_path / "d")
    if old_save:
        as_version_1(tmp_path / "d", hooked)
    loaded = Decomposition.load(tmp_path / "d", bridge)
    torch.testing.assert_close(loaded.coefficients(x), dec.coefficients(x), rtol=1e-9, atol=1e-12)
    for weight in (bridge.blocks[1].ln2.original_component.weight,  # ones, as folded: no longer an identity
                   bridge.blocks[1].mlp.out.original_component.weight):  # a weight the forward reads
        with torch.no_grad():
            weight.mul_(1.5)
        with pytest.raises(ValueError, match=REFUSED):
            Decomposition.load(tmp_path / "d", bridge)
        with torch.no_grad():
            weight.div_(1.5)


@hooked_only
def test_a_compat_bridges_decomposition_loads_into_the_folded_hooked_transformer(gpt2, tmp_path):
    boot, x = gpt2
    bridge, folder = boot()
    hooked = folded_hooked(folder)
    dec = decompose(bridge, x, cfg(["blocks.0.attn"]), progress=False)
    dec.save(tmp_path / "d")
    loaded = Decomposition.load(tmp_path / "d", hooked)
    torch.testing.assert_close(loaded.coefficients(x), dec.coefficients(x), rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        hooked.unembed.b_U.add_(0.1)
    with pytest.raises(ValueError, match=REFUSED):
        Decomposition.load(tmp_path / "d", hooked)


@pytest.mark.parametrize("version, problem", [("2", "must be an int >= 1"), (3, "version 3 of its fingerprint")])
def test_the_saved_fingerprint_version_is_checked(tmp_path, version, problem):
    model = TinyMLP()
    dec = decompose(model, MLP_DATA, cfg(["fc1"]), progress=False)
    dec.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "decomposition.json").read_text())
    assert meta["fingerprint"]["others_tl_version"] == l3d_io.OTHERS_VERSION
    meta["fingerprint"]["others_tl_version"] = version
    (tmp_path / "d" / "decomposition.json").write_text(json.dumps(meta))
    as_earlier_save(tmp_path / "d")
    with pytest.raises(ValueError, match=problem):
        Decomposition.load(tmp_path / "d", model)


# --- 3. save onto a file ---------------------------------------------------------------------------

@pytest.mark.parametrize("inside", [False, True], ids=["the_file", "a_folder_under_it"])
def test_save_onto_a_file_is_a_value_error_naming_it(tmp_path, inside):
    model = TinyMLP()
    dec = decompose(model, MLP_DATA, cfg(["fc1"]), progress=False)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    message = f"{afile} is a file, not a folder: Decomposition.save writes a folder"
    with pytest.raises(ValueError, match=re.escape(message)):
        dec.save(afile / "dec" if inside else afile)
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
