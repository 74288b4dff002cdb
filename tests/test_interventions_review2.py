"""Second review of the interventions: a tie made by two Parameters sharing memory is refused,
an intervention's context is reusable and exiting two out of order keeps the original
weights, intervention_curve checks its deltas and top_fraction before any work, a number
beyond float's range is refused as non-finite, and half-precision moves are rounded once."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import l3d_lens
import l3d_lens.analysis.impact as impact_module
from l3d_lens.adapters import make_adapter
from l3d_lens.adapters.base import overlap
from l3d_lens.checks import as_number
from l3d_lens.interventions import perturbed_forward, weight_changes

from .helpers import LM_KINDS, tiny_lm, tokens, write_tiny_gpt2

torch.set_num_threads(1)


def dec_of(model, dtype="float64", components=("blocks.0.attn",)):
    cfg = l3d_lens.L3DConfig(components=list(components), n_subnetworks=3, rank=2, epochs=1, batch_size=8,
                             dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one epoch of a tiny model: its loss warning is not tested here
        return l3d_lens.decompose(model, tokens(8, 6), cfg, progress=False)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_restored(model, before):
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} not restored bit-exactly"


# --- 1. a tie by shared memory ----------------------------------------------------------------

class SharedMemoryAE(nn.Module):
    """An autoencoder whose decoder is a second Parameter over the encoder's memory (a common
    way to tie them): an edit of one moves both."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 3, bias=False).double()
        self.dec = nn.Linear(3, 6, bias=False).double()
        self.dec.weight = nn.Parameter(self.enc.weight.data.T)

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


def test_a_weight_tied_by_shared_memory_is_refused():
    """Only one Parameter in two modules counted as a tie: decompose accepted this model, and
    intervene (moving both uses) and intervention_curve (one) disagreed by 3.2."""
    model = SharedMemoryAE()
    assert make_adapter(model).tied_paths("enc.weight") == ["enc.weight", "dec.weight"]
    cfg = l3d_lens.L3DConfig(components=["enc"], n_subnetworks=2, rank=1, epochs=1, batch_size=8, dtype="float64")
    with pytest.raises(ValueError, match=r"enc\.weight .*tied to other weights \(enc\.weight, dec\.weight: one Parameter, or Parameters sharing its memory\)"):
        l3d_lens.decompose(model, torch.randn(16, 6, dtype=torch.float64), cfg, progress=False)


def test_overlap_tells_interleaved_views_from_shared_memory():
    fused = torch.zeros(4, 12)
    q, k = fused[:, :4], fused[:, 4:8]  # column blocks, as a GPT-2 bridge's W_Q and W_K of c_attn
    assert not overlap(q, k) and not overlap(fused[::2], fused[1::2])
    assert overlap(q, fused) and overlap(fused.T, fused) and overlap(fused[1:3, 3:5], q)
    assert not overlap(fused, torch.zeros(4, 12)) and not overlap(fused[:0], fused)


@pytest.mark.parametrize("kind", LM_KINDS)
def test_no_tiny_lm_weight_counts_as_tied(kind):
    adapter = make_adapter(tiny_lm(kind))
    assert {n: adapter.tied_paths(n) for n in adapter.sites if len(adapter.tied_paths(n)) > 1} == {}


@pytest.mark.parametrize("compatibility", [False, True])
def test_a_gpt2_bridges_qkv_views_are_not_ties(tmp_path, compatibility):
    """Outside compatibility mode W_Q, W_K and W_V are views of the fused c_attn: their memory
    spans overlap one another's and lie in c_attn's, which the forward reads through them."""
    transformers = pytest.importorskip("transformers")
    from transformer_lens.model_bridge import TransformerBridge

    folder = write_tiny_gpt2(tmp_path, model=True)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, torch_dtype=torch.float64).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, dtype=torch.float64,
                                                     tokenizer=transformers.AutoTokenizer.from_pretrained(folder))
        if compatibility:
            bridge.enable_compatibility_mode()
    adapter = make_adapter(bridge)
    slots = [param for _, param in adapter._parameter_slots().values()]
    one_parameter = {n for n in adapter.sites if sum(p is adapter.native_parameter(n) for p in slots) > 1}
    assert {n for n in adapter.sites if len(adapter.tied_paths(n)) > 1} == one_parameter
    assert one_parameter == (set() if compatibility else {"embed.W_E", "unembed.W_U"})  # as Hugging Face ties them
    assert len(adapter.unread) == 2 * bridge.cfg.n_layers


# --- 2. a reusable context; exits out of order ------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(delta=2.0), dict(ablate=True)])
def test_an_intervention_context_can_be_entered_again(kwargs):
    """A second ``with ctx:`` raised AttributeError '_GeneratorContextManager' object has no
    attribute 'args'."""
    model = tiny_lm("bridge")
    dec, x = dec_of(model), tokens(3, 6)
    before = params(model)
    ctx = dec.intervene(subnetwork=0, **kwargs)
    outs = []
    for _ in range(2):
        with ctx, torch.no_grad():
            outs.append(model(x))
        assert_restored(model, before)
    assert torch.equal(outs[0], outs[1])
    with ctx:
        with pytest.raises(RuntimeError, match="this intervention is already active"):
            ctx.__enter__()
    assert_restored(model, before)


def test_interventions_exited_out_of_order_leave_the_original_weights():
    """a entered, b entered, a exited, b exited left the weights at W0 + v_0: b restored the
    snapshot it took inside a."""
    model = tiny_lm("bridge")
    dec = dec_of(model)
    before = params(model)
    a, b = dec.intervene(subnetwork=0, delta=1.0), dec.intervene(subnetwork=1, delta=1.0)
    a.__enter__()
    b.__enter__()
    with pytest.warns(RuntimeWarning, match="interventions exited out of order"):
        a.__exit__(None, None, None)
    assert_restored(model, before)
    b.__exit__(None, None, None)
    assert_restored(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nested in order: no warning
        with a, b:
            pass
    assert_restored(model, before)


# --- 3. and 4. intervention_curve's checks come first; numbers beyond float's range -------------

def test_an_overflowing_curve_delta_is_refused_before_any_impact_or_forward(monkeypatch):
    """deltas=[1.0, 1e40] on a float32 model computed the impacts and the delta-1.0 forward
    before the overflow error."""
    dec = dec_of(tiny_lm("bridge", dtype=torch.float32), dtype="float32")
    calls = []
    monkeypatch.setattr(impact_module, "impact", lambda *a, **k: calls.append("impact"))
    monkeypatch.setattr(impact_module, "perturbed_forward", lambda *a, **k: calls.append("forward"))
    with pytest.raises(ValueError, match=r"delta 1e\+40 makes blocks\.0\.attn\.\w+ non-finite in torch\.float32"):
        dec.intervention_curve(tokens(4, 6), 0, [1.0, 1e40])
    assert calls == []


def test_top_fraction_takes_number_likes_and_refuses_the_rest():
    """A 0-d tensor raised TypeError from round, a string TypeError from '<'."""
    dec, x = dec_of(tiny_lm("bridge")), tokens(6, 6)
    want = dec.intervention_curve(x, 0, [1.0], top_fraction=0.2)
    for fraction in (torch.tensor(0.2, dtype=torch.float64), np.float64(0.2)):
        assert dec.intervention_curve(x, 0, [1.0], top_fraction=fraction).equals(want)
    for bad in ("0.2", True, float("nan"), 10**400, 1, torch.tensor([0.2])):
        with pytest.raises(ValueError, match=r"top_fraction must be a number in \(0, 1\)"):
            dec.intervention_curve(x, 0, [1.0], top_fraction=bad)


def test_a_number_beyond_floats_range_is_non_finite():
    """delta=10**400 raised a raw OverflowError."""
    assert as_number(10**400) == float("inf") and as_number(-(10**400)) == float("-inf")
    dec = dec_of(tiny_lm("bridge"))
    with pytest.raises(ValueError, match="delta must be a finite number"):
        with dec.intervene(subnetwork=0, delta=10**400):
            pass
    with pytest.raises(ValueError, match="deltas must be a non-empty list of finite numbers"):
        dec.intervention_curve(tokens(4, 6), 0, [1.0, -(10**400)])


# --- 5. half precision: rounded once --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_move_is_rounded_once_and_the_curve_agrees(dtype):
    """The change was rounded to bfloat16, then the sum: ~1 entry in 10 missed the nearest
    bfloat16 to W0 + delta v."""
    model = tiny_lm("bridge", dtype=dtype)
    dec = dec_of(model, dtype="float32", components=("blocks.0.attn", "blocks.1.mlp"))
    adapter, subs, x = make_adapter(model), dec.subnetworks(), tokens(3, 6)
    before = params(model)
    w0 = {n: adapter.weight(n).clone() for n in subs}
    for delta in (0.05, 1.0, -3.0):
        with dec.intervene(subnetwork=0, delta=delta), torch.no_grad():
            for n, v in subs.items():
                assert torch.equal(adapter.weight(n), (w0[n].double() + delta * v[0].double()).to(dtype)), n
            inside = model(x)
        assert_restored(model, before)
        curve = perturbed_forward(dec.adapter, weight_changes(dec.adapter, subs, [0], [delta]), x)
        assert torch.equal(curve, inside)
