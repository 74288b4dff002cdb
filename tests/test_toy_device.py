"""The toy metrics work wherever the model and its decomposition live (a GPU after
``Toy.to("cuda")``): every tensor ``l3d_lens.toy`` makes names its device, taken from its inputs.

There is no GPU here, so the meta device stands in for one. ``_ToyFactoriesOnMeta`` sends every
tensor the toy code creates without naming a device there instead of the CPU: a meta tensor
mixes with the model's CPU tensors no more than a CPU tensor mixes with a CUDA model, and has no
values to read, so any such tensor makes ``evaluate`` raise or differ. That cannot see a tensor
from the user, the truth or the core meeting one on another device; the metrics that read no
values are run with their operands on meta and on the CPU for that.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import l3d_lens
from l3d_lens.toy import data, metrics, models, train
from l3d_lens.toy.reproduce import evaluate, recommended_config
from l3d_lens.toy.train import make_toy

torch.set_num_threads(1)

TOY_DIR = "l3d_lens/toy/"


class _ToyFactoriesOnMeta(TorchFunctionMode):
    """Send a tensor constructor called from ``l3d_lens/toy/`` without ``device=`` to the meta
    device; calls from anywhere else (the core, torch, this test) are left alone."""

    def __init__(self):
        super().__init__()
        self.moved: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        caller = sys._getframe(1).f_code
        if func in _device_constructors() and kwargs.get("device") is None \
                and TOY_DIR in caller.co_filename.replace("\\", "/"):
            kwargs["device"] = "meta"
            self.moved.append(f"{func.__name__} in {caller.co_filename}:{sys._getframe(1).f_lineno}")
        return func(*args, **kwargs)


def test_the_stand_in_device_catches_a_device_less_tensor_of_the_toy_code():
    """The check itself bites: a constructor with no device in a file of the toy code lands on
    meta, one that names its device or is called from elsewhere stays on the CPU."""
    toy_code = compile("(torch.eye(2), torch.zeros(2, device='cpu'))", "l3d_lens/toy/any.py", "eval")
    with _ToyFactoriesOnMeta() as mode:
        moved, named = eval(toy_code, {"torch": torch})
        assert torch.eye(2).device.type == "cpu" and data.circuit_matrix(3, 3, seed=0).device.type == "cpu"
    assert moved.device.type == "meta" and named.device.type == "cpu"
    assert mode.moved == ["eye in l3d_lens/toy/any.py:1"]


@pytest.mark.parametrize("name", ["tms", "tmcs", "higher_rank", "square"])
def test_evaluate_creates_every_tensor_on_its_inputs_device(name, monkeypatch):
    """``evaluate`` with every device-less toy tensor on the stand-in device gives the same
    result, key for key, as on the CPU (NaN where the CPU run has NaN)."""
    monkeypatch.setattr(train, "LEARNED_R2", -math.inf)  # a 2-epoch x² model learns no feature
    toy = make_toy(name, 0, epochs=2, n_train=400, n_l3d=96, n_eval=300)
    dec = l3d_lens.decompose(toy.model, toy.l3d_data, recommended_config(name, epochs=2), progress=False)
    expected = evaluate(toy, dec)
    with _ToyFactoriesOnMeta() as mode:
        got = evaluate(toy, dec)
    assert mode.moved == [], mode.moved
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert _same(got[key], value), key


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return a == b


def test_the_metrics_evaluate_does_not_call_create_their_tensors_on_the_inputs_device():
    """The public metrics ``evaluate`` leaves out for TMCS (``masked_weights``, the gradient
    directions scored as subnetworks) make no device-less tensor either."""
    toy = make_toy("tmcs", 0, epochs=2, n_train=400, n_l3d=96, n_eval=100)
    with _ToyFactoriesOnMeta() as mode:
        own = metrics.model_circuit_matrix(toy.model)
        truth = metrics.superposition_directions(toy.model)
        masked = metrics.masked_weights(toy.model, {"encoder.weight": torch.ones(1, 5, 10, dtype=torch.bool)})
        grads = metrics.gradient_directions(toy.model, toy.eval_data, ["encoder.weight", "decoder.weight"])
        rec = metrics.circuit_recovery(toy.model, grads, toy.truth["A"])
    assert mode.moved == [], mode.moved
    assert own.shape == (10, 10) and truth["encoder.weight"].shape == (10, 5, 10)
    assert torch.equal(masked["encoder.weight"][0], toy.model.get_parameter("encoder.weight").detach())
    assert rec["match"] == list(range(10)) and math.isfinite(rec["pearson_r"])


def test_toy_to_moves_the_model_data_and_truth_and_returns_the_toy():
    toy = make_toy("higher_rank", 0, epochs=1, n_train=64, n_l3d=8, n_eval=8)
    assert toy.to("meta") is toy
    tensors = [*toy.model.parameters(), toy.l3d_data, toy.eval_data, toy.truth["A"]]
    assert all(t.device.type == "meta" for t in tensors)
    assert toy.truth["group_size"] == 5 and toy.inputs(4, 0).device.type == "cpu"


def test_make_toy_builds_and_trains_on_the_cpu_whatever_the_default_device():
    """Under ``torch.set_default_device`` (here: meta, standing in for "cuda") the toy's seeded
    CPU generators would meet tensors made elsewhere; the toy is built on the CPU, the same bit
    for bit."""
    small = dict(epochs=1, n_train=64, n_l3d=8, n_eval=8, check_learned=False)
    for name in ("tms", "tmcs", "higher_rank", "square"):
        plain = make_toy(name, 0, **small)
        with torch.device("meta"):
            other = make_toy(name, 0, **small)
        assert all(p.device.type == "cpu" for p in other.model.parameters())
        assert torch.equal(other.eval_data, plain.eval_data) and other.train_losses == plain.train_losses
        mine, theirs = plain.model.state_dict(), other.model.state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_metrics_bring_the_second_operand_to_the_first_ones_device():
    """A truth, masks or subnetworks on another device than the model or the first operand (here
    the CPU against meta, where these metrics read no values) are moved, not mixed."""
    model = models.tmcs(0).to("meta")
    cpu_subs = {"encoder.weight": torch.rand(3, 5, 10), "decoder.weight": torch.rand(3, 10, 5)}
    meta_truth = {n: v.to("meta") for n, v in cpu_subs.items()}
    assert metrics.cosine_matrix(meta_truth, cpu_subs).device.type == "meta"
    masked = metrics.masked_weights(model, {"encoder.weight": torch.ones(2, 5, 10, dtype=torch.bool)})
    assert masked["encoder.weight"].device.type == "meta"
    x = torch.rand(4, 10, device="meta")
    assert metrics.output_effects(model, cpu_subs, x, [0]).device.type == "meta"
    assert metrics.intervention_change(model, {"encoder.weight": torch.rand(5, 10)}, x, [0.1]).device.type == "meta"
