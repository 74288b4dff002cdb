"""Review fixes from reading the docs as a new user: token strings for report views, python -m
l3d_lens, safetensors files readable as their JSON twins, the CLI's contrastive refusal, a
demo rerun that skips parts, retraining the embedded model to its own folder, and the toy
demo's shortened training."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import l3d_lens
from l3d_lens.zoo import induction

from .helpers import HAS_HOOKED, tiny_lm, tokens
from .test_cli_review import TINY, one_line_error, run
from .test_cli_review3 import SMALL_DEMO

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def test_to_str_words_puts_a_space_before_each_word():
    ids = induction.repeated_sequences(2, seed=0)
    words = induction.to_str_words(ids[0])
    assert words[0] == induction.BOS and induction.to_str_tokens(ids[0])[0] == induction.BOS
    assert words[1:] == [" " + w for w in induction.to_str_tokens(ids[0])[1:]]
    assert induction.to_str_words(ids[:1]) == words  # any shape, read in order


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "l3d_lens", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: l3d-lens")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_saved_tensors_are_as_readable_as_their_json(tmp_path, umask_022):
    """safetensors' save_file made them 0600 whatever the umask; the JSON beside them 0644."""
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn"], n_subnetworks=2, rank=1, epochs=1, batch_size=4)
    dec = l3d_lens.decompose(tiny_lm("bridge"), tokens(8, 6), cfg, progress=False, checkpoint=tmp_path / "ckpt",
                             checkpoint_every=1)
    dec.save(tmp_path / "dec")
    assert mode(tmp_path / "dec" / "factors.safetensors") == mode(tmp_path / "dec" / "decomposition.json") == 0o644
    saved = [p for p in (tmp_path / "ckpt").rglob("*.safetensors")]
    assert saved and all(mode(p) == 0o644 for p in saved)
    from l3d_lens.toy import make_toy
    from l3d_lens.toy.saving import save_toy

    save_toy(make_toy("tms", 0, epochs=1), tmp_path / "toy")
    assert {mode(p) for p in (tmp_path / "toy").iterdir()} == {0o644}


def test_the_cli_refuses_a_contrastive_config_before_loading(capsys, tmp_path, no_model_loading):
    line = one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--out", tmp_path / "o",
                          *TINY, "--set", "reference=paired")
    assert "reference='paired' (contrastive L3D) needs a reference input paired with each sample, which no flag " \
           "of the CLI takes" in line


def test_a_demo_rerun_that_skips_parts_notes_the_earlier_files(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--out", tmp_path, *SMALL_DEMO)
    assert code == 0, err
    code, _, err = run(capsys, "demo", "--out", tmp_path, *SMALL_DEMO, "--no-report", "--no-compare")
    assert code == 0, err
    assert (f"note: {tmp_path / 'comparison_heads.csv'} (--no-compare), {tmp_path / 'report.html'} (--no-report) in "
            f"{tmp_path} are not from this run") in err


def test_induction_load_takes_a_folder_save_wrote(tmp_path):
    model = induction.load()
    induction.save(model, tmp_path / "m")
    again = induction.load(path=tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="holds no saved induction model"):
        induction.load(path=tmp_path / "missing")


@pytest.mark.skipif(HAS_HOOKED, reason="the refusal is for TransformerLens 4, which has no HookedTransformer")
def test_retraining_the_default_variant_on_tl4_says_why_not(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_default_model.py"), "--out",
                           str(tmp_path / "m")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2
    assert "needs HookedTransformer (TransformerLens 2 or 3)" in done.stderr and "--variant redundant" in done.stderr
    assert not (tmp_path / "m").exists()


def test_the_toy_demo_keeps_a_shortened_x2_training(capsys):
    """--train-epochs 1 on x² ended in make_toy's 'never learned a feature' RuntimeError."""
    spec = importlib.util.spec_from_file_location("toy_demo", ROOT / "demos" / "toy_models.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    rows = demo.run("square", seed=0, restarts=1, epochs=2, train_epochs=1)
    assert rows[0]["metric"] == "reconstruction error"
