"""``toy.chain_step``: the hand-written training step of the toy chains gives autograd's numbers
bit for bit, and ``fit`` leaves to autograd every model it cannot reproduce exactly."""

import pytest
import torch
from torch import nn

from l3d_lens.toy import chain_step, data, models, train
from l3d_lens.toy.train import fit


def _autograd_only(monkeypatch):
    monkeypatch.setattr(chain_step, "linear_chain", lambda model: None)


def _task(name, dtype=torch.float32):
    """(model builder, x, y, lr) with 300 rows: 9 full batches of 32 and a last one of 12."""
    if name == "square":
        x = data.sparse_features(300, 5, seed=3, signed=True)
        return models.square_mlp, x.to(dtype), (x ** 2).to(dtype), 1e-2
    if name == "tmcs":
        x = data.sparse_features(300, 10, seed=3)
        return models.tmcs, x.to(dtype), (x @ data.circuit_matrix(10, 10, seed=4).T).to(dtype), 1e-3
    if name == "higher_rank":
        x = data.grouped_features(300, 25, 5, seed=3)
        return models.higher_rank, x.to(dtype), (x @ data.circuit_matrix(25, 10, seed=4).T).to(dtype), 1e-3
    x = data.sparse_features(300, 5, seed=3)
    return models.tms, x.to(dtype), x.to(dtype), 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["square", "tmcs", "higher_rank", "tms_untied"])
def test_chain_step_trains_every_toy_chain_exactly_as_autograd_and_adamw(name, dtype, monkeypatch):
    """Three epochs of ``fit`` (with a short last batch): losses and every parameter equal, bit
    for bit, to ``loss.backward(); AdamW(fused=True).step()``; the hand-written step was used."""
    build, x, y, lr = _task(name, dtype)
    fast = build(1).to(dtype)
    used = []
    real = chain_step.ChainStep.__call__
    monkeypatch.setattr(chain_step.ChainStep, "__call__", lambda self, xb, yb: used.append(1) or real(self, xb, yb))
    fast_losses = fit(fast, x, y, epochs=3, seed=5, lr=lr)
    assert len(used) == 3 * 10
    monkeypatch.undo()
    _autograd_only(monkeypatch)
    slow = build(1).to(dtype)
    slow_losses = fit(slow, x, y, epochs=3, seed=5, lr=lr)
    assert fast_losses == slow_losses and fast_losses[-1] < fast_losses[0]
    for (key, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters()):
        assert a.dtype == dtype and torch.equal(a, b), key
    assert all(p.grad is None for p in fast.parameters())


def test_make_toy_gives_the_same_model_with_the_chain_step_as_with_autograd(monkeypatch):
    """The x^2 toy with probes, a give-up check and its learned check: same model, same losses."""
    fast = train.make_toy("square", 4, epochs=6, n_train=400, n_l3d=10, n_eval=10, check_learned=False)
    _autograd_only(monkeypatch)
    slow = train.make_toy("square", 4, epochs=6, n_train=400, n_l3d=10, n_eval=10, check_learned=False)
    assert fast.train_losses == slow.train_losses
    assert all(torch.equal(a, b) for a, b in zip(fast.model.parameters(), slow.model.parameters()))


class _Doubled(models.SquareMLP):
    def forward(self, x):
        return 2 * super().forward(x)


def _hooked(model):
    model.layers[0].register_forward_hook(lambda module, args, out: out * 0.5)
    return model


def _frozen(model):
    model.layers[0].bias.requires_grad_(False)
    return model


def _narrow(model):
    return models.SquareMLP(5, (5, 1, 5), seed=0)


@pytest.mark.parametrize("change", [_Doubled, _hooked, _frozen, _narrow], ids=["subclass", "hook", "frozen", "width-1"])
def test_fit_leaves_a_model_the_chain_step_cannot_reproduce_to_autograd(change, monkeypatch):
    """A subclass with its own forward, a user's hook, a frozen parameter and a width-1 layer get
    autograd's step: ``linear_chain`` refuses them, and ``fit`` trains them as autograd does (each
    trains differently from the plain model, as it must)."""
    model = change(seed=0) if change is _Doubled else change(models.square_mlp(0))
    assert chain_step.linear_chain(model) is None and chain_step.linear_chain(models.square_mlp(0)) is not None
    build, x, y, lr = _task("square")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    losses = fit(model, x, y, epochs=2, seed=5, lr=lr)
    _autograd_only(monkeypatch)
    again = change(seed=0) if change is _Doubled else change(models.square_mlp(0))
    again.load_state_dict(state)
    assert fit(again, x, y, epochs=2, seed=5, lr=lr) == losses
    plain = fit(models.square_mlp(0), x, y, epochs=2, seed=5, lr=lr)
    assert losses != plain


def test_a_global_module_hook_sends_fit_to_autograd():
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(1))
    try:
        assert chain_step.linear_chain(models.tmcs(0)) is None
    finally:
        handle.remove()
    assert chain_step.linear_chain(models.tmcs(0)) is not None and not seen


def test_chain_step_refuses_an_optimizer_it_does_not_reproduce():
    model = models.tmcs(0)
    chain = chain_step.linear_chain(model)
    for opt in (torch.optim.AdamW(model.parameters(), fused=True, amsgrad=True),
                torch.optim.AdamW(model.parameters(), foreach=False)):
        with pytest.raises(ValueError, match="fused AdamW"):
            chain_step.ChainStep(chain, opt)


def test_a_model_with_parameters_of_two_dtypes_is_not_a_chain_for_one_fused_call():
    """``ChainStep`` updates every parameter in one fused AdamW call, which takes one device and
    dtype: a model mixing dtypes is left to autograd, and ``ChainStep`` itself refuses it."""
    model = models.tmcs(0)
    chain = chain_step.linear_chain(model)
    model.decoder.bias.data = model.decoder.bias.data.double()
    assert chain_step.linear_chain(model) is None
    with pytest.raises(ValueError, match="one device in one dtype"):
        chain_step.ChainStep(chain, torch.optim.AdamW(model.parameters(), fused=True))


def test_the_step_count_is_shared_and_counts_every_step():
    """One step tensor serves every parameter (AdamW's per-parameter counts are always equal
    here): after n steps it reads n, as AdamW's own state would."""
    build, x, y, lr = _task("square")
    model = build(1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    step = chain_step.ChainStep(chain_step.linear_chain(model), opt)
    for xb, yb in zip(x.split(32), y.split(32)):
        step(xb, yb)
    assert all(s is step.step for s in step.steps) and step.step.item() == 10


def test_fit_under_autocast_is_left_to_autograd(monkeypatch):
    """Under torch.autocast the forward casts to the autocast dtype, which the hand-written step
    does not: it failed ('expected scalar type Float but found BFloat16'); autograd trains it."""
    build, x, y, lr = _task("square")
    with torch.autocast("cpu", torch.bfloat16):
        assert chain_step.linear_chain(build(1)) is None
        model = build(1)
        losses = fit(model, x, y, epochs=2, seed=5, lr=lr)
    assert chain_step.linear_chain(build(1)) is not None
    _autograd_only(monkeypatch)
    with torch.autocast("cpu", torch.bfloat16):
        again = build(1)
        assert fit(again, x, y, epochs=2, seed=5, lr=lr) == losses
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
