"""The embedded model loads identically in every adapter; attribution shares are the same
across TransformerLens layouts; the demo command runs; user errors are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import l3d_lens
from l3d_lens.zoo import induction, two_tasks

from .helpers import HAS_HOOKED

KINDS = (["hooked"] if HAS_HOOKED else []) + ["bridge"]


@pytest.mark.parametrize("variant", sorted(induction.VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_default_model_reproduces_its_training_logits(kind, variant):
    meta = induction.metadata(variant)
    model = induction.load(kind, variant=variant)
    with torch.no_grad():
        logits = model(torch.tensor(meta["probe_tokens"]))
    assert torch.allclose(logits[0, -1], torch.tensor(meta["probe_logits_first"]), atol=1e-4)
    first, second = induction.induction_loss(model)
    assert second < 0.1 < 3.0 < first  # it predicts the repeated half, and nothing else


@pytest.mark.parametrize("variant", sorted(two_tasks.VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_two_task_model_reproduces_its_saved_logits(kind, variant):
    meta = two_tasks.metadata(variant)
    model = two_tasks.load(kind, variant=variant)
    with torch.no_grad():
        out = model(torch.tensor(meta["probe_tokens"]))
    logits = out if isinstance(out, torch.Tensor) else out.logits
    assert float(logits.double().sum()) == pytest.approx(meta["probe_logits_sum"], rel=1e-5, abs=1e-3)
    assert two_tasks.evaluate(model) == pytest.approx(meta["evaluation"], rel=1e-3)


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match=r"variant='sparse'; choose one of \['default', 'redundant'\]"):
        induction.load(variant="sparse")
    with pytest.raises(ValueError, match="head_sparsity must be >= 0"):
        induction.train(steps=1, head_sparsity=-1.0)


def test_attribution_shares_sum_to_one_and_agree_across_layouts():
    data = induction.repeated_sequences(64, seed=3)
    cfg = l3d_lens.L3DConfig(components=["blocks.1.attn"], n_subnetworks=3, rank=2, epochs=1, batch_size=16)
    results = {}
    for kind in KINDS:
        dec = l3d_lens.decompose(induction.load(kind), data, cfg, progress=False)
        df = dec.attribution()
        assert torch.allclose(torch.tensor(df.groupby("subnetwork")["share"].sum().to_numpy()), torch.ones(3,
                              dtype=torch.float64), atol=1e-5)
        heads = dec.head_attribution(as_tensor=True)
        assert heads.shape == (3, 2, 4) and heads[:, 0].abs().sum() == 0  # only layer 1 was decomposed
        b_o = df[df["kind"] == "b_O"]
        assert b_o["head"].isna().all() and len(b_o) == 3
        results[kind] = heads
    if len(results) == 2:
        assert torch.allclose(results["hooked"], results["bridge"], atol=1e-5)


def test_neuron_attribution(tmp_path):
    from .helpers import tiny_lm, tokens

    model = tiny_lm("bridge", dtype=torch.float32)
    dec = l3d_lens.decompose(model, tokens(8, 6), l3d_lens.L3DConfig(components="blocks.0.mlp[0:5]", n_subnetworks=2,
                                                                     rank=1, epochs=1), progress=False)
    neurons = dec.neuron_attribution()
    assert sorted(neurons["neuron"].unique().tolist()) == list(range(32))
    assert neurons[neurons["neuron"] >= 5]["share"].max() == 0  # outside the slice
    assert neurons.groupby("subnetwork")["share"].sum().round(5).tolist() == [1.0, 1.0]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "l3d_lens.cli", *args], capture_output=True, text=True, timeout=300)


def test_demo_runs(tmp_path):
    res = run_cli("demo", "--out", str(tmp_path), "--n-sequences", "64", "--epochs", "1", "--quiet", "--no-compare",
                  "--no-report")
    assert res.returncode == 0, res.stderr
    assert "reconstruction error" in res.stdout and "top heads" in res.stdout
    assert (tmp_path / "decomposition" / "factors.safetensors").is_file()


def test_cli_user_error_is_one_line(tmp_path):
    res = run_cli("demo", "--out", str(tmp_path), "--n-subnetworks", "0", "--quiet")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["l3d-lens demo: error: n_subnetworks must be an int >= 1, got 0"]
