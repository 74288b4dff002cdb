"""Review fixes: top_logits and intervention_curve go in cfg.batch_size chunks (they held the
outputs of all the data at once), head_attribution's tensor is float64, and top_samples checks
context=."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import l3d_lens
import l3d_lens.analysis.impact as impact_module
from l3d_lens.analysis.impact import output_change, output_derivative
from l3d_lens.interventions import perturbed_forward, weight_changes

from .helpers import LM_KINDS, tiny_lm, tokens

torch.set_num_threads(1)

MODES = [dict(sample="token"), dict(sample="sequence", position=2), dict(sample="sequence", position="all")]
MODE_IDS = ["token", "sequence-2", "sequence-all"]


def dec_of(x, batch_size=3, **kw):
    """A float64 decomposition of a tiny LM trained on ``x`` (8 sequences: chunks of 3, 3, 2)."""
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.mlp"], n_subnetworks=3, rank=2, epochs=1,
                             batch_size=batch_size, dtype="float64", reference="mean", **kw)
    return l3d_lens.decompose(tiny_lm(LM_KINDS[0]), x, cfg, progress=False)


def record_rows(monkeypatch, dec) -> list[int]:
    """The number of sequences of every forward pass the analyses run from now on."""
    seen: list[int] = []
    adapter = dec.adapter
    forward, functional = adapter.forward, adapter.functional_forward

    def counted_forward(x, *args, **kwargs):
        seen.append(x.shape[0])
        return forward(x, *args, **kwargs)

    def counted_functional(params, x, *args, **kwargs):
        seen.append(x.shape[0])
        return functional(params, x, *args, **kwargs)

    monkeypatch.setattr(adapter, "forward", counted_forward)
    monkeypatch.setattr(adapter, "functional_forward", counted_functional)
    return seen


# --- 1. top_logits and intervention_curve in cfg.batch_size chunks ----------------------------

@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_top_logits_goes_in_chunks_and_equals_one_pass(monkeypatch, mode):
    """The means over chunks of 3, 3 and 2 sequences equal those of one pass over all 8 (one
    JVP of the whole data, as top_logits ran before), to float64 round-off (rtol 1e-10); each
    JVP returns only the chosen positions of at most batch_size sequences."""
    x = tokens(8, 6, seed=3)
    dec = dec_of(x, **mode)
    d = output_derivative(dec, x, 1)  # the one pass: [8, 6, V]
    if mode.get("position") not in (None, "all"):
        d = d[:, [mode["position"]]]
    d = d.reshape(-1, d.shape[-1])
    mean_abs, mean = d.abs().mean(0), d.mean(0)
    want = torch.argsort(mean_abs, descending=True)[:6]

    shapes = []

    def recorded_jvp(*args, **kwargs):
        out = torch.func.jvp(*args, **kwargs)
        shapes.append(tuple(out[1].shape))
        return out

    monkeypatch.setattr(impact_module, "jvp", recorded_jvp)
    seen = record_rows(monkeypatch, dec)
    top = dec.top_logits(x, 1, k=6)
    assert seen == [3, 3, 2]
    positions = 1 if mode.get("position") == 2 else 6
    assert shapes == [(3 * positions, 20), (3 * positions, 20), (2 * positions, 20)]
    assert top["token_id"].tolist() == want.tolist()
    torch.testing.assert_close(torch.tensor(top["mean_abs_dlogit"].tolist(), dtype=torch.float64), mean_abs[want],
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.tensor(top["mean_dlogit"].tolist(), dtype=torch.float64), mean[want],
                               rtol=1e-10, atol=1e-14)


def test_top_logits_with_chosen_positions_in_chunks():
    x = tokens(8, 6, seed=4)
    dec = dec_of(x, sample="token")
    d = output_derivative(dec, x, 0)[:, [0, -1]].reshape(-1, 20)
    top = dec.top_logits(x, 0, k=20, positions=[0, -1])
    order = top["token_id"].tolist()
    torch.testing.assert_close(torch.tensor(top["mean_abs_dlogit"].tolist(), dtype=torch.float64),
                               d.abs().mean(0)[order], rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.tensor(top["mean_dlogit"].tolist(), dtype=torch.float64), d.mean(0)[order],
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_intervention_curve_goes_in_chunks_and_equals_one_pass(monkeypatch, mode):
    """Every forward pass holds at most batch_size sequences, and the curve equals the one
    computed from one pass over all 8 sequences before and after each delta, to float64
    round-off (rtol 1e-9); the model's weights are left exactly as they were."""
    x = tokens(8, 6, seed=5)
    dec = dec_of(x, **mode)
    adapter = dec.adapter
    weights = {n: adapter.weight(n).clone() for n in adapter.sites}
    imp = dec.impact(x)
    deltas = [-1.0, 0.5, 2.0]

    per = imp[..., 2].reshape(-1)
    n_top = round(0.25 * per.numel())
    top = torch.zeros(per.numel(), dtype=torch.bool)
    top[torch.argsort(per, descending=True)[:n_top]] = True
    view = dec._task.view
    with adapter.session(), torch.no_grad():
        before = view(adapter.forward(x))
    want = []
    for delta in deltas:
        after = view(perturbed_forward(adapter, weight_changes(adapter, dec.subnetworks(), [2], [delta]), x))
        change = output_change(before, after, True)
        change = (change.sum(-1) if mode.get("position") == "all" else change).reshape(-1)
        want.append((change[top].mean().item(), change[~top].mean().item()))

    seen = record_rows(monkeypatch, dec)
    curve = dec.intervention_curve(x, 2, deltas, top_fraction=0.25, impacts=imp)
    assert seen == [3] * 4 + [3] * 4 + [2] * 4  # per chunk: before, then after each delta
    got = torch.tensor(curve[["change_top", "change_rest"]].values.tolist(), dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=0)
    assert curve["delta"].tolist() == deltas
    assert all(torch.equal(adapter.weight(n), w) for n, w in weights.items())


def test_a_batch_size_above_the_number_of_sequences_is_one_chunk(monkeypatch):
    """As before: one pass of all the data (for the curve: before, then after the delta)."""
    x = tokens(8, 6, seed=6)
    dec = dec_of(x, batch_size=32, sample="token")
    seen = record_rows(monkeypatch, dec)
    dec.top_logits(x, 0, k=3)
    dec.intervention_curve(x, 0, [1.0], impacts=torch.rand(8, 6, 3, generator=torch.Generator().manual_seed(0)))
    assert seen == [8, 8, 8]


# --- 2. head_attribution(as_tensor=True) in float64 -------------------------------------------

def test_head_attribution_tensor_is_float64_as_its_shares():
    x = tokens(6, 8, seed=1)
    cfg = l3d_lens.L3DConfig(components=["blocks.*.attn.W_O"], n_subnetworks=4, rank=2, epochs=1, batch_size=3,
                             dtype="float64", include_biases=False)
    dec = l3d_lens.decompose(tiny_lm(LM_KINDS[0]), x, cfg, progress=False)
    tensor = dec.head_attribution(as_tensor=True)
    assert tensor.dtype == torch.float64 == dec.head_effects(as_tensor=True).dtype
    exact = torch.zeros(4, 2, 2, dtype=torch.float64)
    for row in dec.head_attribution().groupby(["subnetwork", "layer", "head"], as_index=False)["share"].sum() \
            .itertuples(index=False):
        exact[int(row.subnetwork), int(row.layer), int(row.head)] = row.share
    assert torch.equal(tensor, exact)


# --- 3. top_samples checks context= ---------------------------------------------------------

@pytest.mark.parametrize("context", [0, -3, 2.5, True, "8", None])
def test_top_samples_refuses_a_bad_context_before_any_work(monkeypatch, context):
    x = tokens(8, 6, seed=7)
    dec = dec_of(x, sample="token")

    def no_work(*args, **kwargs):
        raise AssertionError("impacts were computed before context= was checked")

    monkeypatch.setattr(impact_module, "impact", no_work)
    with pytest.raises(ValueError, match=r"context must be an int >= 1 \(how many tokens to show.*got "):
        dec.top_samples(x, 0, k=2, context=context)


def test_top_samples_takes_an_integer_context_of_any_kind():
    x = tokens(8, 6, seed=7)
    dec = dec_of(x, sample="token")
    imp = dec.impact(x, n_references=1)
    plain = dec.top_samples(x, 0, k=3, impacts=imp, context=2)
    assert all(1 <= len(c.split()) <= 2 for c in plain["context"])
    for same in (np.int64(2), torch.tensor(2)):
        assert dec.top_samples(x, 0, k=3, impacts=imp, context=same).equals(plain)
