"""The memory estimate charges what a plain module's own forward/backward holds, the logits'
copies where the divergence reads every position, and the outputs gathered under
torch.distributed (BENCHMARKS.md "Memory estimate")."""

from __future__ import annotations

import torch
from torch import nn

import l3d_lens
from l3d_lens import distributed, memory
from l3d_lens.decomposition import build_task

from .helpers import tiny_lm

MODEL = "model forward/backward"
GATHERED = "outputs gathered from every rank"


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 256), nn.GELU(),
                         nn.Linear(256, 8))


def held_by_a_forward(model: nn.Module, rows: torch.Tensor) -> int:
    """Bytes of every leaf module's output in a forward of ``rows`` (what the backward keeps)."""
    held = []
    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(lambda m, a, out: held.append(out.numel() * out.element_size()))
               for m in leaves]
    try:
        with torch.no_grad():
            model(rows)
    finally:
        for h in handles:
            h.remove()
    return sum(held)


def test_a_plain_module_is_charged_its_own_activations_without_being_changed():
    """A plain nn.Module's activations were charged nothing: 0.13x the measured peak on a
    64-4096-4096-64 MLP. The one-row pass that sizes them leaves the model as it was."""
    model = mlp()
    cfg = l3d_lens.L3DConfig(components=["0.weight"], n_subnetworks=4, rank=2, reference="mean", divergence="mse")
    task = build_task(model, cfg)
    model.train()
    rng = torch.get_rng_state()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    part = memory.estimate(task, 512, 1)[MODEL]
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(m._forward_hooks for m in model.modules())
    assert part > 0
    assert part >= held_by_a_forward(model.eval(), torch.randn(512, 16))


def test_a_plain_module_without_a_linear_first_is_charged_its_linear_widths():
    """Where no one-row input can be made (the first weighted layer is a convolution), its
    Linear layers' widths still give the activations a lower guide."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 30, 512), nn.ReLU(), nn.Linear(512, 10))
    cfg = l3d_lens.L3DConfig(components=["2.weight"], n_subnetworks=4, rank=2, reference="mean", divergence="mse")
    part = memory.estimate(build_task(model, cfg), 64, 1)[MODEL]
    assert part >= 64 * 4 * (512 + 512 + 10)


def test_the_logits_copies_where_the_divergence_reads_every_position():
    """Sequence mode with position="all" (and token mode) holds about six copies of the logits
    at the peak; the estimate charged four (0.64x at vocab 20000), the same as for one position."""
    model = tiny_lm("bridge", dtype=torch.float32, d_vocab=4000)
    batch, seq = 8, 6
    logits = batch * seq * 4000 * 4

    def model_part(**kw):
        cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=4, rank=2, **kw)
        return memory.estimate(build_task(model, cfg), batch, seq)[MODEL]

    every = model_part(sample="sequence", position="all")
    one = model_part(sample="sequence", position=-1)
    assert every >= 6 * logits
    assert one < every
    assert model_part(sample="token") >= 6 * logits


def test_the_outputs_gathered_under_torch_distributed_grow_with_the_world(monkeypatch):
    """Every rank gathers the whole batch's outputs for the references, while the estimate is
    made for its share of the batch: 0.70x per rank at 2 ranks before."""
    model = tiny_lm("bridge", dtype=torch.float32, d_vocab=1000)
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=4, rank=2, sample="sequence", position="all")
    task = build_task(model, cfg)
    gathered = {}
    for world in (1, 2, 4):
        monkeypatch.setattr(distributed, "world", lambda world=world: world)
        gathered[world] = memory.estimate(task, 4, 6)[GATHERED]
    assert gathered[1] == 0
    assert 0 < gathered[2] < gathered[4]
    assert gathered[2] >= 2 * 4 * 6 * 1000 * 4  # the global batch's log-probs, once


def test_a_plain_module_under_torch_distributed_gathers_its_outputs(monkeypatch):
    task = build_task(mlp(), l3d_lens.L3DConfig(components=["0.weight"], n_subnetworks=4, rank=2))
    monkeypatch.setattr(distributed, "world", lambda: 2)
    assert memory.estimate(task, 32, 1)[GATHERED] >= 2 * 32 * 8 * 4


def test_a_plain_module_is_sized_on_a_row_of_its_data(monkeypatch):
    """A model applied per position to [B, T, d] inputs keeps T positions' activations a row: the
    estimate measures them on a row of the data, where a zero [1, d] row saw one position
    (about 65x low at T = 128)."""
    model = mlp()
    x = torch.randn(64, 32, 16)  # 32 positions a row
    cfg = l3d_lens.L3DConfig(components=["0.weight"], n_subnetworks=4, rank=2, reference="mean", divergence="mse",
                             batch_size=64)
    task = build_task(model, cfg)
    with_row = memory.estimate(task, 64, 1, x[:1])[MODEL]
    assert with_row >= held_by_a_forward(model.eval(), x)
    assert with_row > 16 * memory.estimate(task, 64, 1)[MODEL]
    seen = []
    real = memory.check

    def spy(task, batch_size, seq_len, device, row=None, **kw):
        seen.append(row)
        return real(task, batch_size, seq_len, device, row, **kw)

    monkeypatch.setattr(memory, "check", spy)
    l3d_lens.decompose(model, x, cfg.replace(epochs=1), progress=False)
    assert seen and seen[0] is not None and torch.equal(seen[0], x[:1])
