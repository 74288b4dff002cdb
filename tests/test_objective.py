"""The expanded (factored) objective equals its materialised definition, values and gradients."""

from __future__ import annotations

import torch

from l3d_lens.objective import aux_errors, sample_errors, topk_mask


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
