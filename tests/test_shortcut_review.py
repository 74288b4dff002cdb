"""Before training, the fast engine's per-sample gradient is checked against autograd's for one
sample (``engine.check_shortcut``): models where its shortcut silently gave wrong numbers (a
weight also read outside its layer, a sequence-first layer whose sequence is as long as the
check's batch, a bias of a layer that flattens the batch) are refused naming engine='exact',
which gives the oracle's numbers there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import l3d_lens
from l3d_lens import training

torch.set_num_threads(1)


class TiedTMS(nn.Module):
    """Anthropic-style TMS: the decoder reads the encoder's weight directly."""

    def __init__(self):
        super().__init__()
        self.W = nn.Linear(5, 2, bias=False)
        self.b = nn.Parameter(torch.randn(5) * 0.1)

    def forward(self, x):
        return F.relu(F.linear(self.W(x), self.W.weight.T, self.b))


class SeqFirst(nn.Module):
    """[n, T, d] -> [T, n, d] before its Linear, as batch_first=False layers expect."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x.transpose(0, 1))).cumsum(0)
        return self.head(h).transpose(0, 1)


class Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 3), nn.Linear(15, 2)

    def forward(self, x):  # [n, 5, 4]
        return self.head(self.fc(x.reshape(-1, 4)).reshape(x.shape[0], -1))


class SecondUse(nn.Module):
    """Per position, activations centred over positions (so a sample's in (x) dout terms cancel
    when its inputs share a large offset), and fc.weight also read outside fc."""

    def __init__(self, alpha: float):
        super().__init__()
        self.fc, self.head, self.proj, self.alpha = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(6, 3), alpha

    def forward(self, x):  # [n, T, 6]
        h = self.fc(x)
        h = torch.tanh(h - h.mean(1, keepdim=True))
        return self.head(h) + self.alpha * self.proj(h @ self.fc.weight)


class KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(input=x)))


class Square(torch.autograd.Function):  # no setup_context: torch.func cannot transform it
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class CustomActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(Square.apply(self.fc(x)))


def cfg(components, **kw):
    return l3d_lens.L3DConfig(**{**dict(components=components, n_subnetworks=2, rank=1, epochs=1, batch_size=8,
                                        divergence="mse", reference="zero", dtype="float64"), **kw})


def oracle_gsq(model, names, x):
    """||g_i||^2 per sample of 0.5 ||f(x_i)||^2 (MSE to the zero reference) over the named parameters."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xi):
        return 0.5 * (functional_call(model, p, (xi[None],))[0] ** 2).sum()

    out = []
    for i in range(x.shape[0]):
        g = grad(loss)(params, x[i])
        out.append(sum(g[n].pow(2).sum() for n in names))
    return torch.stack(out)


def refused_before_training(monkeypatch, model, x, components, match):
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match=match):
        l3d_lens.decompose(model, x, cfg(components), progress=False)
    monkeypatch.undo()


@pytest.mark.parametrize("make, x, components, names, match", [
    (TiedTMS, (16, 5), ["W"], ["W.weight"], r"differs from autograd's .*tied as F.linear.*use engine='exact'"),
    (SeqFirst, (16, 2, 4), ["fc"], ["fc.weight", "fc.bias"], r"differs from autograd's .*use engine='exact'"),
    (Flatten, (16, 5, 4), ["fc.bias"], ["fc.bias"], r"batch axis first .* fc:out saw shape \(10, 3\) for a batch of 2"),
])
def test_a_wrong_shortcut_is_refused_and_exact_gives_the_oracle(monkeypatch, make, x, components, names, match):
    torch.manual_seed(0)
    model, x = make().double(), torch.randn(*x, dtype=torch.float64)
    refused_before_training(monkeypatch, model, x, components, match)
    dec = l3d_lens.decompose(model, x, cfg(components, engine="exact"), progress=False)
    want = oracle_gsq(model, names, x)
    assert ((dec.gradient_norms(x) - want).abs().max() / want.abs().max()).item() < 1e-10


def test_a_layer_called_with_a_keyword_input_is_read():
    torch.manual_seed(0)
    model, x = KeywordCall().double(), torch.randn(16, 4, dtype=torch.float64)
    fast = l3d_lens.decompose(model, x, cfg(["fc"]), progress=False)
    want = oracle_gsq(model, ["fc.weight", "fc.bias"], x)
    assert ((fast.gradient_norms(x) - want).abs().max() / want.abs().max()).item() < 1e-10


def test_a_model_torch_func_cannot_transform_still_runs_on_the_fast_engine():
    torch.manual_seed(0)
    model, x = CustomActivation().double(), torch.randn(16, 4, dtype=torch.float64)
    dec = l3d_lens.decompose(model, x, cfg(["fc"]), progress=False)
    assert dec.gradient_norms(x).shape == (16,)
    with pytest.raises(ValueError, match="torch.func cannot transform"):
        l3d_lens.decompose(model, x, cfg(["fc"], engine="exact"), progress=False)


def test_no_false_refusal_under_autocast_for_a_zero_gradient_or_in_half_precision():
    """The check compares like with like: autograd under the same autocast (bf16 rounding alone
    was 4-14% of the norm), round-off against the size of the gradient's terms (b_K's gradient
    is exactly zero, the fast engine's ~1e-9), and not at all in a half-precision model."""
    from l3d_lens.decomposition import build_task
    from l3d_lens.engine import check_shortcut
    from l3d_lens.zoo import induction

    model = induction.load()
    base = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.attn"], n_subnetworks=8, rank=2, top_k=0.05)
    for seed in range(10):
        x = induction.repeated_sequences(4, seed=seed)
        check_shortcut(build_task(model, base.replace(autocast="bf16", sample="sequence")), x)
        check_shortcut(build_task(model, base.replace(autocast="bf16", sample="sequence", position="all",
                                                      reference="mean")), x)
    x = induction.repeated_sequences(4, seed=0)
    for sample in ("token", "sequence"):
        check_shortcut(build_task(model, base.replace(components=["blocks.0.attn.b_K", "blocks.1.attn.b_K"],
                                                      sample=sample)), x)
    half = induction.load().to(torch.float16)
    check_shortcut(build_task(half, base.replace(components=["blocks.0.attn.W_Q", "blocks.0.attn.W_K"],
                                                 sample="sequence")), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_cancelling_terms_do_not_hide_a_wrong_shortcut(monkeypatch, dtype, alpha):
    """A shared offset of 1000 makes ||in|| ||dout|| 1,600-2,600x the gradient's norm: a round-off
    floor at that scale passed errors of 22-59% of the norm (||g||^2 over the data up to 56% off)."""
    torch.manual_seed(0)
    model = SecondUse(alpha).to(dtype)
    x = (1000 + torch.randn(32, 64, 6)).to(dtype)
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match="differs from autograd's"):
        l3d_lens.decompose(model, x, cfg(["fc"], dtype="float64"), progress=False)
