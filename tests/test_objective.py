"""The expanded (factored) objective equals its materialised definition, values and gradients;
the pieces resampling needs (materialised per-sample gradients, a Tucker projection) are exact."""

from __future__ import annotations

import pytest
import torch

import l3d_lens
from l3d_lens.decomposition import build_task
from l3d_lens.objective import aux_errors, l3d_loss, loss_terms, sample_errors, topk_mask
from l3d_lens.subnetworks import init_factors, resolve_ranks
from l3d_lens.resampling import gradient_batch, tucker

from .helpers import tiny_lm, tokens


def materials(seed=0, S=7, K=5, P=11):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(S, P, generator=g, dtype=torch.float64)
    v_in = torch.randn(K, P, generator=g, dtype=torch.float64, requires_grad=True)
    v_out = torch.randn(K, P, generator=g, dtype=torch.float64, requires_grad=True)
    return grads, v_in, v_out


def test_topk_mask_keeps_the_largest_fraction():
    x = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.0]])
    assert topk_mask(x, 0.5).tolist() == [[False, True, True], [True, False, False]]
    assert topk_mask(x, 1.0).all() and topk_mask(x, 1e-9).sum() == 1


def test_sample_errors_and_aux_errors_match_materialised():
    grads, v_in, v_out = materials()
    A, B, G = grads @ v_in.T, grads @ v_out.T, v_out @ v_out.T
    gsq = (grads**2).sum(1)
    mask = topk_mask(A, 0.4)
    errors = sample_errors(A, B, gsq, G, mask)
    c = A * mask
    direct = ((grads - c @ v_out) ** 2).sum(1)
    assert torch.allclose(errors, direct, rtol=1e-12)

    dead = torch.tensor([False, True, False, True, True])
    aux_mask = topk_mask(A * dead, 0.4 * 3 / 5) & dead
    G_frozen = v_out.detach() @ v_out.T
    aux = aux_errors(A, B, errors, G_frozen, G, mask, aux_mask).sum()
    residual = (grads - c.detach() @ v_out.detach())
    direct_aux = ((residual - (A * aux_mask) @ v_out) ** 2).sum()
    assert torch.allclose(aux, direct_aux, rtol=1e-12)
    g1 = torch.autograd.grad(aux, [v_in, v_out], retain_graph=True)
    g2 = torch.autograd.grad(direct_aux, [v_in, v_out])
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert g1[0][~dead].abs().max() == 0  # only dead encoders learn from the aux loss


def test_tucker_recovers_a_tensor_of_lower_multilinear_rank():
    g = torch.Generator().manual_seed(1)
    core = torch.randn(2, 3, 1, generator=g, dtype=torch.float64)
    us = [torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q for n, r in ((5, 2), (4, 3), (6, 1))]
    t = torch.einsum("abc,ia,jb,kc->ijk", core, *us)
    got_core, got_us = tucker(t, (2, 3, 1))
    assert all(torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-12) for u in got_us)
    assert torch.allclose(torch.einsum("abc,ia,jb,kc->ijk", got_core, *got_us), t, atol=1e-12)
    vec_core, (vec_u,) = tucker(torch.tensor([3.0, 4.0], dtype=torch.float64), (1,))
    assert torch.allclose(vec_core * vec_u[:, 0], torch.tensor([3.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("components", [["blocks.0.attn", "blocks.1.mlp"], ["embed", "pos_embed", "unembed"],
                                        ["blocks.1.attn[1]", "blocks.0.mlp[3:9,20]"], ["blocks.0.ln1", "ln_final"]])
@pytest.mark.parametrize("sample", ["token", "sequence"])
def test_gradients_materialised_for_resampling_match_the_exact_engine(components, sample):
    """Resampling forms a few per-sample gradients from the fast engine's captures; they must
    be the exact engine's torch.func gradients, for every kind of weight and sample."""
    model, x = tiny_lm("bridge"), tokens(3, 5, seed=2)
    rows = [0, 4, 2] if sample == "token" else [2, 0]
    got = {}
    for engine in ("fast", "exact"):
        cfg = l3d_lens.L3DConfig(components=components, n_subnetworks=3, rank=2, sample=sample, reference="mean",
                                 engine=engine, dtype="float64")
        task = build_task(model, cfg)
        f = init_factors(task.selected, resolve_ranks(task.selected, 2), 3, torch.Generator().manual_seed(3),
                         torch.float64, torch.device("cpu"))
        stats, rows_of = gradient_batch(task, f, x, torch.Generator().manual_seed(7), None)
        got[engine] = (stats, rows_of(rows))
    # gradients that vanish analytically (b_K: softmax is shift-invariant) are round-off, so each
    # is compared relative to itself plus 1e-9 of the largest gradient anywhere
    scale = max(g.abs().max().item() for g in got["exact"][1].values())
    for name, exact in got["exact"][1].items():
        err = (got["fast"][1][name] - exact).abs().max().item()
        assert err <= 1e-5 * exact.abs().max().item() + 1e-9 * scale, name
    assert torch.allclose(got["fast"][0].A, got["exact"][0].A, rtol=1e-5, atol=1e-9)


def test_loss_terms_batch_and_per_sample_forms_and_zero_gradients():
    grads, v_in, v_out = materials()
    grads[2] = 0.0  # a sample with nothing to reconstruct
    A, B, G = grads @ v_in.T, grads @ v_out.T, v_out @ v_out.T
    gsq = (grads ** 2).sum(1)
    mask = topk_mask(A, 0.4)
    errors = sample_errors(A, B, gsq, G, mask)
    num, den = loss_terms(errors, gsq, "batch")
    assert torch.allclose(num / den, l3d_loss(A, B, gsq, G, 0.4)[0], rtol=1e-12)
    num, den = loss_terms(errors, gsq, "sample")
    keep = gsq > 0
    assert den == 6.0 and torch.isfinite(num)
    assert torch.allclose(num / den, (errors[keep] / gsq[keep]).mean(), rtol=1e-12)
    with pytest.raises(ValueError, match="loss_norm='mean' is not valid; choose one of 'batch', 'sample'"):
        loss_terms(errors, gsq, "mean")
    with pytest.raises(ValueError, match="loss_norm='per_sample' is not valid; choose one of 'batch', 'sample'"):
        l3d_lens.L3DConfig(components="blocks.0.attn", loss_norm="per_sample")
