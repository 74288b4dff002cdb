"""Scale-out: checkpoint/resume after a kill is bit-identical; data-parallel training over
2 gloo processes equals one process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import l3d_lens
from l3d_lens.checkpoint import LOCK

from .scale_helpers import ddp_setup, ddp_small_batch_worker, ddp_worker, resume_setup

ROOT = Path(__file__).resolve().parents[1]


def test_killed_run_resumes_bit_identically(tmp_path):
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "L3D_TEST_SLOW": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", f"from tests.scale_helpers import run_with_checkpoint; "
                             f"run_with_checkpoint({str(ckpt)!r})"], cwd=ROOT, env=env)
    deadline = time.time() + 120
    step = 0
    while time.time() < deadline and proc.poll() is None:
        latest = ckpt / "latest.json"
        if latest.is_file():
            step = json.loads(latest.read_text())["step"]
            if step >= 7:  # mid-epoch 1 of 4 (5 steps per epoch)
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((ckpt / "latest.json").read_text())["step"]
    assert 7 <= killed_at < 20
    model, data, cfg = resume_setup()
    resumed = l3d_lens.decompose(model, data, cfg, progress=False, checkpoint=ckpt)
    model, data, cfg = resume_setup()
    straight = l3d_lens.decompose(model, data, cfg, progress=False)
    assert all(torch.equal(resumed.factors[k], straight.factors[k]) for k in straight.factors)
    assert resumed.history == straight.history
    assert json.loads((ckpt / "latest.json").read_text())["step"] == 20
    assert sorted(p.name for p in ckpt.iterdir()) == [LOCK, "latest.json", "step-20"]  # the lock file stays


def test_checkpoint_of_another_run_is_refused(tmp_path):
    model, data, cfg = resume_setup()
    l3d_lens.decompose(model, data, cfg.replace(epochs=1), progress=False, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="belongs to another run"):
        l3d_lens.decompose(model, data, cfg.replace(epochs=1, seed=3), progress=False, checkpoint=tmp_path)


def test_checkpoint_of_other_batches_is_refused(tmp_path):
    """A list of batches is fingerprinted by its contents (it was by its type alone, so a
    finished checkpoint of other data came back as this run's result)."""
    model, data, cfg = resume_setup()
    l3d_lens.decompose(model, [data[:20], data[20:]], cfg.replace(epochs=1), progress=False, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="belongs to another run"):
        l3d_lens.decompose(model, [data[:20], data[20:].flip(0)], cfg.replace(epochs=1), progress=False,
                           checkpoint=tmp_path)


def test_checkpoint_from_before_a_config_field_existed_resumes(tmp_path):
    """A checkpoint whose saved config lacks fields added since (here the resampling ones) ran
    with their defaults, so it belongs to the same run; a field it has with another value does
    not."""
    model, data, cfg = resume_setup()
    cfg = cfg.replace(epochs=2)
    l3d_lens.decompose(model, data, cfg.replace(epochs=1), progress=False, checkpoint=tmp_path)
    folder = tmp_path / json.loads((tmp_path / "latest.json").read_text())["folder"]
    state = json.loads((folder / "state.json").read_text())
    for field in ("resample_epochs", "resample_max"):
        del state["identity"]["config"][field]
    state["identity"]["config"]["epochs"] = 2  # resume the 1-epoch checkpoint as part of a 2-epoch run
    (folder / "state.json").write_text(json.dumps(state))
    resumed = l3d_lens.decompose(model, data, cfg, progress=False, checkpoint=tmp_path)
    straight = l3d_lens.decompose(model, data, cfg, progress=False)
    assert all(torch.equal(resumed.factors[k], straight.factors[k]) for k in straight.factors)
    assert resumed.history == straight.history
    folder = tmp_path / json.loads((tmp_path / "latest.json").read_text())["folder"]
    state = json.loads((folder / "state.json").read_text())
    state["identity"]["config"]["resample_max"] = 1
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="belongs to another run"):
        l3d_lens.decompose(model, data, cfg, progress=False, checkpoint=tmp_path)


@pytest.mark.parametrize("sample", ["sequence", "token"])
def test_two_gloo_ranks_equal_one_process(tmp_path, sample):
    out = str(tmp_path / "factors.safetensors")
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), out, sample), nprocs=2, join=True)
    model, data, cfg = ddp_setup(sample)
    single = l3d_lens.decompose(model, data, cfg, progress=False)
    ddp = load_file(out)
    # float64 throughout; the only difference is the order of floating-point sums across ranks
    for k, v in single.factors.items():
        assert torch.allclose(ddp[k], v, rtol=1e-9, atol=1e-12), k
    history = json.loads(Path(out + ".history").read_text())
    assert [h["p_act"] for h in history] == [h["p_act"] for h in single.history]  # same top-k choices
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in single.history], rel=1e-9)


@pytest.mark.skipif(not (torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
                    reason="needs 2 CUDA GPUs and NCCL (data-parallel NCCL run; the gloo test covers the CPU)")
def test_two_nccl_ranks_on_two_gpus_equal_one_process(tmp_path):
    """NCCL moves CUDA tensors only: every collective (gathered sizes, summed scalars) must be on
    the data's GPU, or the first step fails."""
    out = str(tmp_path / "factors.safetensors")
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), out, "token", "nccl"), nprocs=2, join=True)
    model, data, cfg = ddp_setup("token")
    single = l3d_lens.decompose(model.to("cuda:0"), data, cfg, progress=False)
    ddp = load_file(out)
    for k, v in single.factors.items():
        assert torch.allclose(ddp[k], v.cpu(), rtol=1e-9, atol=1e-12), k


def test_a_batch_smaller_than_the_world_is_refused_before_training(tmp_path):
    out = str(tmp_path / "error")
    mp.spawn(ddp_small_batch_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    for rank in (0, 1):
        assert Path(f"{out}.{rank}").read_text() == ("with 25 rows and batch_size=8, a batch of 1 rows cannot be split "
                                                     "over 2 ranks; choose them so every batch has a row per rank")
