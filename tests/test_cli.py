"""The ``l3d-lens`` command: help, one-line user errors (exit 2), decompose -> report on a
local Hugging Face model directory with text and a saved dataset, compare, and the demo
writing its report. Offline: the model is a tiny GPT-2 with a byte-level tokenizer built here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l3d_lens.cli import main

from .helpers import HAS_HOOKED, write_tiny_gpt2


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (d_model 32) with a 256-byte vocabulary + <|endoftext|>, no merges."""
    return write_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), model=True)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "decompose", "report", "compare"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["decompose", "--help"])
    out = capsys.readouterr().out
    assert "--components" in out and "--config" in out and "--set FIELD=VALUE" in out


@pytest.mark.parametrize("argv, message", [
    (["decompose", "./no/such/model", "--components", "blocks.0.attn"], "model directory ./no/such/model does not exist"),
    (["decompose", "induction"], "no components to decompose"),
    (["decompose", "induction", "--components", "blocks.0.attn", "--set", "bogus=1"], "unknown config fields ['bogus']"),
    (["decompose", "induction", "--components", "blocks.0.attn", "--set", "novalue"], "write FIELD=VALUE"),
    (["decompose", "induction", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["decompose", "induction", "--components", "blocks.0.attn", "--n-subnetworks", "0"], "n_subnetworks must be"),
    (["decompose", "induction", "--components", "blocks.7.attn"], "blocks.7"),
    (["decompose", "induction", "--components", "blocks.0.attn", "--data", "missing.txt"], "data missing.txt does not exist"),
    (["decompose", "induction", "--components", "blocks.0.attn", "--threads", "0"], "--threads must be >= 1"),
    (["decompose", "induction", "--components", "blocks.0.attn", "--device", "banana"], "--device 'banana': "),
    (["decompose", "induction", "--components", "blocks.0.attn", "--device", "meta"], "--device meta holds no"),
    (["decompose", "induction", "--components", "blocks.0.attn", "--sample", "sequence", "--position", "30"],
     "position=30 is outside the sequences of length 25"),
    (["decompose", "induction", "--components", "blocks.0.attn", "--set", "components=3"],
     "components must be a non-empty selector or list of selectors, e.g. 'blocks.0.attn'"),
    (["report", "no_such_folder"], "no_such_folder is not a folder"),
    (["compare", "--threads", "0"], "--threads must be >= 1"),
])
def test_user_errors_are_one_line(capsys, tmp_path, argv, message):
    if argv[0] == "decompose":
        argv = argv + ["--out", str(tmp_path / "out"), "--quiet"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"l3d-lens {argv[0]}: error: "), err
    assert message in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_device_this_machine_lacks_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--device", "cuda",
                       "--out", str(tmp_path / "out"), "--quiet")
    assert code == 2 and err.strip() == (f"l3d-lens decompose: error: --device cuda: no cuda device is available "
                                         f"to this torch ({torch.__version__}); use --device cpu")


def test_config_file_errors(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("components: [blocks.0.attn\n")
    code, _, err = run(capsys, "decompose", "induction", "--config", bad, "--out", tmp_path / "o")
    assert code == 2 and "invalid YAML" in err and len(err.strip().splitlines()) == 1
    text = tmp_path / "t.txt"
    text.write_text("hello")
    code, _, err = run(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--data", text,
                       "--out", tmp_path / "o")
    assert code == 2 and "has no tokenizer" in err


def test_unknown_model_name_offline_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "l3d_lens.cli", "decompose", "no-such-model-xyz", "--components",
                          "blocks.0.attn", "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("l3d-lens decompose: error: could not load model 'no-such-model-xyz'")


def test_decompose_then_report_on_a_local_model(capsys, tmp_path, hf_dir):
    import datasets

    text = tmp_path / "corpus.txt"
    text.write_text("The cat sat on the mat. " * 40 + "\n<b>bold</b> & </script> tokens stay text.\n" * 5)
    ds = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": [f"sample number {i}: the quick brown fox" for i in range(30)]}).save_to_disk(ds)
    config = tmp_path / "cfg.yaml"
    config.write_text("components: [blocks.0.attn]\nn_subnetworks: 3\nrank: 2\nepochs: 1\nbatch_size: 8\n")
    out = tmp_path / "dec"
    code, stdout, err = run(capsys, "decompose", hf_dir, "--data", text, ds, "--config", config, "--n-subnetworks",
                            "2", "--seq-len", "16", "--max-sequences", "40", "--quiet", "--out", out)
    assert code == 0, err
    assert (out / "factors.safetensors").is_file() and (out / "cli_inputs.json").is_file()
    meta = json.loads((out / "decomposition.json").read_text())
    assert meta["config"]["n_subnetworks"] == 2 and meta["config"]["rank"] == 2  # flag overrides the file
    assert "reconstruction loss" in stdout
    html = tmp_path / "report.html"
    code, stdout, err = run(capsys, "report", out, "--out", html, "--max-sequences", "8", "--n-references", "1",
                            "--quiet")
    assert code == 0, err
    page = html.read_text(encoding="utf-8")
    assert page.count("CircuitsVis.render(") >= 2 and "Subnetwork" in page
    assert "<b>bold" not in page  # tokenizer strings are escaped
    code, _, err = run(capsys, "report", out, "--out", tmp_path / "r.txt")
    assert code == 2 and "must end in .html" in err


def test_compare_and_demo_write_their_outputs(capsys, tmp_path):
    code, stdout, err = run(capsys, "compare", "--n-pairs", "8", "--quiet", "--out", tmp_path / "cmp")
    assert code == 0, err
    assert "spearman" in stdout and (tmp_path / "cmp" / "heads.csv").is_file()
    code, stdout, err = run(capsys, "demo", "--out", tmp_path / "demo", "--n-sequences", "64", "--epochs", "1",
                            "--n-pairs", "8", "--report-sequences", "16", "--quiet")
    assert code == 0, err
    assert "top heads" in stdout and "report:" in stdout
    page = (tmp_path / "demo" / "report.html").read_text(encoding="utf-8")
    assert "Comparison with activation patching" in page and "CircuitsVis.render(" in page
    assert (tmp_path / "demo" / "comparison_heads.csv").is_file()
    code, _, err = run(capsys, "report", tmp_path / "demo" / "decomposition", "--out", tmp_path / "again.html",
                       "--max-sequences", "8", "--n-references", "1", "--quiet")
    assert code == 0, err  # the demo recorded its model and data


@pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer was removed in TransformerLens 4")
def test_local_model_as_hooked_transformer(capsys, tmp_path, hf_dir):
    text = tmp_path / "corpus.txt"
    text.write_text("a small corpus of text for a tiny model. " * 30)
    code, stdout, err = run(capsys, "decompose", hf_dir, "--model-class", "hooked", "--data", text, "--components",
                            "blocks.0.attn", "--n-subnetworks", "2", "--rank", "1", "--epochs", "1", "--seq-len", "16",
                            "--quiet", "--out", tmp_path / "dec", "--report", tmp_path / "r.html")
    assert code == 0, err
    assert json.loads((tmp_path / "dec" / "decomposition.json").read_text())["adapter"] == "hooked_transformer"
    assert (tmp_path / "r.html").is_file()


def test_missing_data_is_named_before_the_model_loads(capsys, monkeypatch, tmp_path):
    """A model given by name is downloaded and loaded first; a mistyped --data path must not wait
    for that."""
    import l3d_lens.cli as cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --data was checked")

    monkeypatch.setattr(cli, "load_model", no_load)
    code, _, err = run(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--data",
                       tmp_path / "missing.txt", "--out", tmp_path / "dec")
    assert code == 2 and "missing.txt does not exist" in err and "Traceback" not in err
