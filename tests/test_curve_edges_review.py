"""Review fixes: intervention_curve read an empty "rest" group (top_fraction covering every
sample, or a single sample) and an unchanged output as selectivity inf; top_samples and
top_logits took k <= 0 (a negative k listed all but the last |k| rows)."""

from __future__ import annotations

import math

import pytest
import torch

import l3d_lens
from l3d_lens.adapters import make_adapter
from l3d_lens.analysis.impact import output_change, ratio
from l3d_lens.interventions import perturbed_forward, weight_changes

from .helpers import HAS_HOOKED, tiny_lm, tokens

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def seq_dec():
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn"], n_subnetworks=3, rank=2, epochs=1, batch_size=8,
                             dtype="float64", sample="sequence", position=-1, reference="uniform")
    return l3d_lens.decompose(tiny_lm("hooked" if HAS_HOOKED else "bridge"), tokens(8, 6), cfg, progress=False)


def test_curve_keeps_one_sample_in_the_rest(seq_dec):
    """top_fraction 0.9 of 4 sequences rounded to all 4: change_rest was NaN, selectivity inf."""
    x = tokens(4, 6, seed=5)
    curve = seq_dec.intervention_curve(x, 0, [1.0], top_fraction=0.9)
    imp = seq_dec.impact(x)[:, 0]
    top = torch.zeros(4, dtype=torch.bool)
    top[torch.argsort(imp, descending=True)[:3]] = True
    adapter = make_adapter(seq_dec.model)
    with torch.no_grad():
        before = seq_dec.model(x)[:, -1]
    after = perturbed_forward(adapter, weight_changes(adapter, seq_dec.subnetworks(), [0], [1.0]), x)[:, -1]
    change = output_change(before, after, True)
    assert curve["change_rest"][0] == pytest.approx(change[~top].mean().item())
    assert curve["selectivity"][0] == pytest.approx(change[top].mean().item() / change[~top].mean().item())
    assert math.isfinite(curve["selectivity"][0])


def test_curve_refuses_a_single_sample(seq_dec):
    with pytest.raises(ValueError, match="needs at least 2 samples; these data have 1"):
        seq_dec.intervention_curve(tokens(1, 6, seed=5), 0, [1.0])


def test_curve_reads_no_change_as_nan(seq_dec):
    """A delta too small to move float32 weights changed nothing on either side: was inf."""
    curve = seq_dec.intervention_curve(tokens(4, 6, seed=5), 0, [1e-30])
    assert curve["change_top"][0] == 0 and curve["change_rest"][0] == 0
    assert math.isnan(curve["selectivity"][0])


@pytest.mark.parametrize("on, off, want", [(2.0, 4.0, 0.5), (1.0, 0.0, math.inf), (0.0, 0.0, math.nan),
                                           (float("nan"), 1.0, math.nan), (1.0, float("nan"), math.nan)])
def test_ratio(on, off, want):
    got = ratio(on, off)
    assert (math.isnan(got) and math.isnan(want)) or got == want


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "3"])
def test_top_tables_refuse_bad_k(seq_dec, k):
    x = tokens(4, 6, seed=5)
    for table in (seq_dec.top_samples, seq_dec.top_logits):
        with pytest.raises(ValueError, match=r"k must be an int >= 1 \(how many rows to list\)"):
            table(x, 0, k)


def test_report_of_a_single_sequence_notes_the_missing_curve(seq_dec, tmp_path):
    """The report drew the curve of a single sequence against an empty rest; now it says why not."""
    path = l3d_lens.viz.report(seq_dec, tokens(1, 6, seed=5), tmp_path / "r.html")
    text = path.read_text()
    assert "these data have a single sample" in text
