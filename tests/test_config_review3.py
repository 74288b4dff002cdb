"""L3DConfig takes numbers as the rest of l3d_lens does (numpy scalars and 0-d tensors too) and
stores them plain; a per-weight rank is read-only and hashable; what would not survive a save, or
would have no effect, is refused or warned at once."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from l3d_lens import L3DConfig
from l3d_lens.toy.sweep import sweep

from .helpers import TinyMLP

INT_FIELDS = {"n_subnetworks": 8, "rank": 4, "seed": 3, "epochs": 5, "position": -2, "lr_step": 2, "batch_size": 16,
              "dead_steps": 7, "resample_max": 2}


@pytest.mark.parametrize("field, value", sorted(INT_FIELDS.items()))
@pytest.mark.parametrize("kind", [np.int64, np.int32, torch.tensor])
def test_numpy_and_tensor_ints_are_stored_as_the_python_int(field, value, kind):
    """np.int64(8) was refused ("must be an int >= 1, got np.int64(8)") though checks.py reads
    numbers as Python, numpy or 0-d tensor values alike; kept plain, the config equals, hashes
    and saves as the one given Python ints."""
    given = L3DConfig("blocks.0.attn", **{field: kind(value)})
    plain = L3DConfig("blocks.0.attn", **{field: value})
    assert type(getattr(given, field)) is int and getattr(given, field) == value
    assert given == plain and hash(given) == hash(plain)
    assert json.dumps(given.to_dict()) == json.dumps(plain.to_dict())


def test_epoch_fields_take_numpy_ints():
    cfg = L3DConfig("blocks.0.attn", epochs=np.int64(10), aux_coef=0.1, aux_epochs=np.int64(4),
                    loss_norm="sample", loss_norm_epochs=np.int32(5), resample_epochs=[np.int64(2), torch.tensor(6)])
    assert (cfg.aux_epochs, cfg.loss_norm_epochs, cfg.resample_epochs) == (4, 5, (2, 6))
    assert all(type(v) is int for v in (cfg.epochs, cfg.aux_epochs, cfg.loss_norm_epochs, *cfg.resample_epochs))


@pytest.mark.parametrize("field, value", [("top_k", 0.25), ("lr", 0.5), ("lr_decay", 0.5), ("aux_coef", 0.25)])
@pytest.mark.parametrize("kind", [np.float32, np.float64, torch.tensor])
def test_numpy_and_tensor_floats_are_stored_as_the_python_float(field, value, kind):
    """np.float32(0.2) and a 0-d tensor were refused for float fields (np.float64 passed as a
    float subclass, and was kept as one)."""
    given = L3DConfig("blocks.0.attn", **{field: kind(value)})
    assert type(getattr(given, field)) is float
    assert given == L3DConfig("blocks.0.attn", **{field: value})


def test_an_int_rank_stays_a_count_and_a_float_rank_a_fraction():
    assert L3DConfig("x", rank=np.int64(4)).rank == 4 and type(L3DConfig("x", rank=np.int64(4)).rank) is int
    fraction = L3DConfig("x", rank=np.float32(0.25)).rank
    assert type(fraction) is float and fraction == 0.25
    per = L3DConfig("x", rank={"default": np.int64(2), "fc1.weight": [np.int64(1), torch.tensor(2)],
                               "fc2.weight": np.float32(0.5)}).rank
    assert per == {"default": 2, "fc1.weight": (1, 2), "fc2.weight": 0.5}
    assert [type(v) for v in (per["default"], *per["fc1.weight"], per["fc2.weight"])] == [int, int, int, float]


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_subnetworks=np.bool_(True)), "n_subnetworks must be an int >= 1"),
    (dict(n_subnetworks=torch.tensor(True)), "n_subnetworks must be an int >= 1"),
    (dict(n_subnetworks=np.float64(8.0)), r"n_subnetworks must be an int >= 1, got 8\.0"),
    (dict(n_subnetworks=8.0), r"n_subnetworks must be an int >= 1, got 8\.0"),
    (dict(epochs=torch.tensor(3.0)), r"epochs must be an int >= 1, got 3\.0"),
    (dict(n_subnetworks=np.array([8])), "n_subnetworks must be an int >= 1"),
    (dict(n_subnetworks=np.int64(0)), "n_subnetworks must be an int >= 1, got 0"),
    (dict(top_k=np.float32(1.5)), r"top_k must be a fraction in \(0, 1\]"),
    (dict(rank=np.float64(2.0)), r"rank as a fraction must be in \(0, 1\), got 2\.0; use an int"),
])
def test_what_a_python_value_would_not_pass_still_fails(kwargs, match):
    """A bool, an array or an integral float is no count, whatever its type."""
    with pytest.raises(ValueError, match=match):
        L3DConfig("blocks.0.attn", **kwargs)


def test_a_per_weight_rank_is_read_only_and_hashable():
    """A frozen config with a dict rank was unhashable, and cfg.rank['default'] = -5 changed it
    past validation."""
    cfg = L3DConfig("blocks.0.attn", rank={"default": 2, "blocks.0.attn.W_Q": [1, 2, 3]})
    with pytest.raises(TypeError):
        cfg.rank["default"] = -5
    assert cfg.rank["default"] == 2
    same = L3DConfig("blocks.0.attn", rank={"blocks.0.attn.W_Q": (1, 2, 3), "default": 2})
    assert cfg == same and hash(cfg) == hash(same) and len({cfg, same}) == 1
    assert cfg != cfg.replace(rank={"default": 2})


def test_a_per_weight_rank_saves_copies_and_pickles():
    given = {"default": 2, "blocks.0.attn.W_Q": [1, 2, 3]}
    cfg = L3DConfig("blocks.0.attn", rank=given)
    d = cfg.to_dict()
    assert type(d["rank"]) is dict and d["rank"] == given
    assert L3DConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert L3DConfig.from_dict(d) == cfg and cfg.replace(seed=1).rank == cfg.rank
    assert copy.deepcopy(cfg) == cfg and pickle.loads(pickle.dumps(cfg)) == cfg
    assert repr(cfg.rank) == repr({"default": 2, "blocks.0.attn.W_Q": (1, 2, 3)})


@pytest.mark.filterwarnings("ignore:the last epoch's reconstruction loss")
def test_a_per_weight_rank_runs_and_sweeps():
    """resolve_ranks and the sweep (which copies a row's rank) take the read-only mapping."""
    torch.manual_seed(0)
    x = torch.rand(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = L3DConfig(components=["fc1", "fc2"], n_subnetworks=2, rank={"default": 1}, epochs=1, batch_size=8)
    rows = sweep(TinyMLP(), x, cfg, seeds=[0])
    assert rows[0]["rank"] == {"default": 1}


@pytest.mark.parametrize("key", [0, ("fc1.weight",), None])
def test_a_rank_key_must_be_a_weight_name(key):
    """rank={0: 2} was accepted, but came back from JSON as {'0': 2}: another config."""
    with pytest.raises(ValueError, match=r"rank as a dict is keyed by weight names \(strings") as e:
        L3DConfig("blocks.0.attn", rank={key: 2})
    assert str(e.value).endswith(f"or 'default' for the rest, got the key {key!r}")


@pytest.mark.parametrize("kind", [set, frozenset])
def test_components_as_a_set_are_refused(kind):
    """A set's order depends on PYTHONHASHSEED, so to_dict (compared on resuming a checkpoint and
    across torchrun ranks) differed between processes."""
    with pytest.raises(ValueError, match="components must be a list or tuple, not a set: their order is saved"):
        L3DConfig(kind({"blocks.0.attn", "blocks.1.attn"}))


def test_components_in_order_are_the_same_in_every_process():
    code = "from l3d_lens import L3DConfig; print(L3DConfig(['blocks.1.attn', 'blocks.0.attn']).to_dict()['components'])"
    outs = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": s, "PATH": "/usr/bin"},
                           capture_output=True, text=True, check=True).stdout for s in ("1", "2")}
    assert outs == {"['blocks.1.attn', 'blocks.0.attn']\n"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=4, aux_coef=0.1, aux_epochs=5),
     r"aux_epochs=5 is beyond the run's epochs=4: the auxiliary loss applies in every epoch, as aux_epochs=None does"),
    (dict(epochs=4, loss_norm="sample", loss_norm_epochs=6),
     r"loss_norm_epochs=6 is beyond the run's epochs=4: the per-sample loss applies in every epoch"),
    (dict(epochs=4, aux_epochs=2),
     r"aux_epochs=2 limits the auxiliary loss to its first epochs, but aux_coef=0 turns that loss off"),
])
def test_epoch_limits_that_change_nothing_warn(kwargs, match):
    """aux_epochs or loss_norm_epochs beyond epochs, and aux_epochs without the aux loss, were
    accepted and did nothing, silently; a warning (not an error: a sweep over epochs or aux_coef,
    or a saved run, may hold one) names them, and the config still builds and round-trips."""
    with pytest.warns(UserWarning, match=match):
        cfg = L3DConfig("blocks.0.attn", **kwargs)
    with pytest.warns(UserWarning, match=match):
        assert L3DConfig.from_dict(cfg.to_dict()) == cfg


def test_epoch_limits_up_to_the_run_are_kept():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = L3DConfig("blocks.0.attn", epochs=4, aux_coef=0.1, aux_epochs=4, loss_norm="sample", loss_norm_epochs=4)
    assert (cfg.aux_epochs, cfg.loss_norm_epochs) == (4, 4)
    with pytest.warns(UserWarning, match=r"aux_epochs=4 is beyond the run's epochs=3"):
        cfg.replace(epochs=3)


def test_a_per_weight_rank_is_still_a_dict_to_read():
    """A read-only Mapping broke what worked on the dict a config kept before: json.dumps,
    ``|``, ``.copy()`` and isinstance(rank, dict)."""
    cfg = L3DConfig("blocks.0.attn", rank={"default": 2, "blocks.0.attn.W_Q": (1, 2, 3)})
    assert isinstance(cfg.rank, dict)
    assert json.loads(json.dumps(cfg.rank)) == {"default": 2, "blocks.0.attn.W_Q": [1, 2, 3]}
    assert cfg.rank | {"default": 3} == {"default": 3, "blocks.0.attn.W_Q": (1, 2, 3)}
    mine = cfg.rank.copy()
    mine["default"] = 4
    assert type(mine) is dict and cfg.rank["default"] == 2
    for edit in (lambda r: r.update(default=3), lambda r: r.pop("default"), lambda r: r.setdefault("x", 1),
                 lambda r: r.clear(), lambda r: r.popitem(), lambda r: r.__ior__({"default": 3})):
        with pytest.raises(TypeError, match="a config's rank is read-only"):
            edit(cfg.rank)
    assert cfg.rank == {"default": 2, "blocks.0.attn.W_Q": (1, 2, 3)}
    assert hash(cfg) == hash(L3DConfig("blocks.0.attn", rank={"blocks.0.attn.W_Q": [1, 2, 3], "default": 2}))


def test_an_epoch_limit_warning_points_at_the_callers_line():
    with pytest.warns(UserWarning, match="is beyond the run's epochs") as record:
        L3DConfig("blocks.0.attn", epochs=4, aux_coef=0.1, aux_epochs=5)
    assert record[0].filename == __file__
