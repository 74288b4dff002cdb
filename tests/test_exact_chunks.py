"""The exact engine takes its per-sample gradients a chunk of samples at a time, written into
one tensor (no copy of the batch per position, no concatenation): every chunking gives the
torch.func oracle's gradients, and its finiteness check and ||g||^2 read every chunk."""

from __future__ import annotations

import pytest
import torch

import l3d_lens
from l3d_lens.decomposition import build_task
from l3d_lens.engine import exact, stats

from .helpers import LM_KINDS, tiny_lm, tokens
from .reference import per_sample_grads

RTOL = 1e-10  # float64 model: the chunked vmap and the one-sample-at-a-time oracle differ by round-off only


def task_of(model, sample):
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.mlp[3:9]"], n_subnetworks=3, rank=1,
                             sample=sample, reference="paired", engine="exact", dtype="float64")
    return build_task(model, cfg)


@pytest.mark.parametrize("sample", ["token", "sequence"])
@pytest.mark.parametrize("chunk", [1, 4, 7, None])
def test_every_chunking_gives_the_oracle_gradients(lm_kind, sample, chunk):
    model = tiny_lm(lm_kind)
    x, ref = tokens(5, 6, seed=1), tokens(5, 6, seed=2)  # 30 token samples: no chunk size divides them evenly
    task = task_of(model, sample)
    got = exact.per_sample_gradients(task, x, None, ref, chunk_size=chunk)
    want = per_sample_grads(model, [s.name for s in task.selected], x, ref, sample)
    scale = max(g.abs().max() for g in want.values())  # b_K's gradient is zero up to round-off
    for s in task.selected:
        w = want[s.name] if s.axis is None else want[s.name].index_select(s.axis + 1, torch.tensor(s.indices))
        assert got[s.name].shape == w.shape
        assert ((got[s.name] - w).abs().max() / scale).item() < RTOL, s.name


def test_a_chunk_holds_about_chunk_elements_gradient_entries(monkeypatch):
    task = task_of(tiny_lm(LM_KINDS[0]), "token")
    per_sample = sum(torch.Size(s.shape).numel() for s in task.selected)
    monkeypatch.setattr(exact, "CHUNK_ELEMENTS", 3 * per_sample + 1)
    assert exact.chunk_rows(task) == 3
    monkeypatch.setattr(exact, "CHUNK_ELEMENTS", per_sample // 2)
    assert exact.chunk_rows(task) == 1  # one sample's gradients over the budget: one at a time
    monkeypatch.setattr(exact, "CHUNK_ELEMENTS", 2**40)
    assert exact.chunk_rows(task) == 64
    calls = []
    real = exact.vmap

    def counting(fn, in_dims):
        def run(params, xs, rs, masks):
            calls.append(xs.shape[0])
            return real(fn, in_dims=in_dims)(params, xs, rs, masks)
        return run

    monkeypatch.setattr(exact, "vmap", counting)
    monkeypatch.setattr(exact, "CHUNK_ELEMENTS", 7 * per_sample)
    x = tokens(3, 6, seed=1)
    exact.per_sample_gradients(task, x, None, tokens(3, 6, seed=2))
    assert calls == [7, 7, 4]  # 18 token samples, 7 at a time: the batch is never vmapped whole


@pytest.mark.parametrize("where", [0, 9, -1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_finiteness_check_reads_every_chunk(where, bad):
    g = torch.ones(10, 3, 4)
    assert stats.all_finite(g)
    g[where, 2, 3] = bad
    assert len(stats.row_chunks(g, elements=24)) == 5
    assert not stats.all_finite(g)
    assert not all(bool(torch.isfinite(c).all()) for c in stats.row_chunks(g, elements=24)) and len(stats.row_chunks(g, elements=1)) == 10


def test_a_nonfinite_gradient_in_a_later_chunk_stops_the_exact_engine(monkeypatch):
    task = task_of(tiny_lm(LM_KINDS[0]), "token")
    real = exact.per_sample_gradients

    def poisoned(*args, **kwargs):
        grads = real(*args, **kwargs)
        name = next(iter(grads))
        grads[name][-1].view(-1)[-1] = float("nan")
        return grads

    monkeypatch.setattr(l3d_lens.engine, "per_sample_gradients", poisoned)
    monkeypatch.setattr(stats, "row_chunks", lambda t, elements=2**24: t.split(1))
    f = {n: t for n, t in l3d_lens.subnetworks.init_factors(
        task.selected, l3d_lens.subnetworks.resolve_ranks(task.selected, 1), 3, torch.Generator().manual_seed(0),
        torch.float64, torch.device("cpu")).items()}
    with pytest.raises(l3d_lens.engine.NonFiniteGradient):
        l3d_lens.engine.batch_stats(task, f, tokens(3, 6, seed=1), None, tokens(3, 6, seed=2))


def test_squared_norms_sum_every_chunk():
    g = torch.randn(50, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    whole = g.reshape(50, -1).pow(2).sum(-1)
    chunked = torch.cat([c.reshape(c.shape[0], -1).pow(2).sum(-1) for c in stats.row_chunks(g, elements=60)])
    assert torch.equal(chunked, whole)


def test_gradients_come_in_the_factors_dtype_without_a_cast_copy_after():
    """A float32 model with float64 factors: the gradients are written in float64 as they come,
    the values a cast of the model-dtype gradients would give."""
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    tasks = {d: build_task(mlp, l3d_lens.L3DConfig(components=["0.weight"], n_subnetworks=2, rank=1, engine="exact",
                                                   divergence="mse", reference="mean", dtype=d))
             for d in ("float32", "float64")}
    g32 = exact.per_sample_gradients(tasks["float32"], x, None)["0.weight"]
    g64 = exact.per_sample_gradients(tasks["float64"], x, None)["0.weight"]
    assert g32.dtype == torch.float32 and g64.dtype == torch.float64
    assert torch.equal(g64, g32.double())
