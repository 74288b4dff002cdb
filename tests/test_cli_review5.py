"""Review fixes of the ``l3d-lens`` command (5): the memory check's refusal is one error line;
numbers YAML or --set give as strings (1e-3, .001) are read as numbers; a folder that is not a
saved decomposition, --position without --sample sequence and reference 'zero' on a language
model are refused before the model loads; seeds whose derived seeds overflow are refused by
the flags; a --config folder or non-UTF-8 file is named as such; data are read only as far as
--max-sequences needs, .jsonl lines end at "\\n" only and extensions match in any case; a report
written through a symlink can be rewritten, and a dangling symlink above an output is named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import l3d_lens.cli as cli

from .test_cli import hf_dir  # noqa: F401 - the tiny local GPT-2 fixture
from .test_cli_review import argparse_error, one_line_error, run

torch.set_num_threads(1)

TINY = ["--components", "blocks.0.attn", "--n-subnetworks", "2", "--rank", "1", "--epochs", "1", "--quiet"]
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def tiny_model(hf_dir):  # noqa: F811
    return cli.load_model(str(hf_dir), "bridge")


@pytest.fixture(scope="module")
def saved_dec(tmp_path_factory) -> Path:
    """A tiny decomposition of the embedded model, saved by ``decompose``."""
    out = tmp_path_factory.mktemp("dec") / "dec"
    code = cli.main(["decompose", "induction", *TINY, "--max-sequences", "16", "--batch-size", "8", "--out", str(out)])
    assert code == 0
    return out


def config_args(tmp_path, *argv):
    return cli.build_parser().parse_args(["decompose", "induction", "--out", str(tmp_path / "o"), *map(str, argv)])


# --- 1. the memory check's refusal --------------------------------------------------------------


def test_a_run_that_cannot_fit_in_memory_is_one_error_line(capsys, tmp_path):
    line = one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--n-subnetworks",
                          "100000", "--max-sequences", "16", "--epochs", "1", "--out", tmp_path / "o", "--quiet")
    assert "GiB" in line  # the estimate and what is available
    assert not (tmp_path / "o" / "decomposition.json").exists()


# --- 2. numbers written as strings in a config file or --set --------------------------------------


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    pytest.importorskip("yaml")
    config = tmp_path / "cfg.yaml"
    config.write_text("components: [blocks.0.attn]\nlr: 1e-3\naux_coef: 5E-2\nposition: '3'\nsample: sequence\n")
    cfg = cli.build_config(config_args(tmp_path, "--config", config))
    assert cfg.lr == 0.001 and cfg.aux_coef == 0.05 and cfg.position == 3


def test_set_numbers_that_are_not_json_are_numbers(tmp_path):
    cfg = cli.build_config(config_args(tmp_path, "--components", "blocks.0.attn", "--set", "lr=.001", "--set",
                                       "lr_decay=0.5", "--set", "dead_steps= 7"))
    assert cfg.lr == 0.001 and cfg.lr_decay == 0.5 and cfg.dead_steps == 7
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got 'fast'"):  # not a number: as before
        cli.build_config(config_args(tmp_path, "--components", "blocks.0.attn", "--set", "lr=fast"))


# --- 3. checks before the model loads -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["empty", "no-factors", "corrupt", "array"])
def test_a_folder_that_is_not_a_saved_decomposition_is_refused_before_the_model_loads(capsys, tmp_path, hf_dir,  # noqa: F811
                                                                                     no_model_loading, kind):
    folder = tmp_path / "notadec"
    folder.mkdir()
    if kind != "empty":
        (folder / "decomposition.json").write_text({"no-factors": "{}", "corrupt": '{"config": ', "array": "[1]"}[kind])
    if kind in ("corrupt", "array"):
        (folder / "factors.safetensors").write_bytes(b"")
    (tmp_path / "c.txt").write_text(TEXT)
    line = one_line_error(capsys, "report", folder, "--model", hf_dir, "--data", tmp_path / "c.txt",
                          "--out", tmp_path / "r.html")
    expected = {"empty": "is not a saved decomposition (needs decomposition.json and factors.safetensors)",
                "no-factors": "is not a saved decomposition (needs decomposition.json and factors.safetensors)",
                "corrupt": "decomposition.json is not valid JSON",
                "array": "decomposition.json holds a JSON list, not the object Decomposition.save writes"}[kind]
    assert expected in line


@pytest.mark.parametrize("flags, message", [
    (["--position", "3"], "position=3 applies to sample='sequence' only"),
    (["--set", "reference=zero"], "reference='zero' needs divergence='mse'"),
])
def test_settings_a_language_model_cannot_use_are_refused_before_it_loads(capsys, tmp_path, hf_dir,  # noqa: F811
                                                                          no_model_loading, flags, message):
    (tmp_path / "c.txt").write_text(TEXT)
    line = one_line_error(capsys, "decompose", hf_dir, "--data", tmp_path / "c.txt", "--out", tmp_path / "o",
                          *TINY, *flags)
    assert message in line


# --- 4. seeds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["demo", "--seed", str(2**64 - 1)],
    ["compare", "--seed", str(2**64 - 101)],
    ["decompose", "induction", "--components", "blocks.0.attn", "--out", "o", "--data-seed", str(-2**63 - 1)],
])
def test_seeds_whose_derived_seeds_overflow_are_refused_by_the_flags(capsys, argv):
    line = argparse_error(capsys, argv)
    assert "must be an int in -2**63 .. 2**64 - 102" in line and ("--seed" in line or "--data-seed" in line)


def test_the_largest_seed_the_flags_take_gives_every_derived_seed():
    assert cli.build_parser().parse_args(["compare", "--seed", str(2**64 - 102)]).seed == 2**64 - 102
    clean, corrupted, _ = cli.induction_pairs(2, seed=cli.CLI_SEEDS[1] + 100)  # as compare and demo draw
    assert clean.shape == corrupted.shape
    cli.induction_pairs(2, seed=cli.CLI_SEEDS[0] + 100)


def test_a_recorded_data_seed_out_of_range_is_refused(tmp_path):
    (tmp_path / cli.RECORD).write_text(json.dumps({"model": "induction", "seed": 2**64 - 1}))
    with pytest.raises(cli.UserError, match=r"'seed' must be in -2\*\*63 .. 2\*\*64 - 102, as --data-seed"):
        cli._read_record(tmp_path)


# --- 5. messages --------------------------------------------------------------------------------


def test_a_config_folder_and_a_config_that_is_not_utf8_are_named(capsys, tmp_path):
    (tmp_path / "cfgdir").mkdir()
    line = one_line_error(capsys, "decompose", "induction", "--config", tmp_path / "cfgdir", "--out", tmp_path / "o")
    assert "is a folder" in line and "cfgdir" in line
    (tmp_path / "latin.yaml").write_bytes("components: [blocks.0.attn]  # café".encode("latin-1"))
    line = one_line_error(capsys, "decompose", "induction", "--config", tmp_path / "latin.yaml", "--out", tmp_path / "o")
    assert "latin.yaml" in line and "not a UTF-8" in line


def test_report_of_a_folder_that_is_no_decomposition_says_so_before_asking_for_model(capsys, tmp_path):
    (tmp_path / "plain").mkdir()
    line = one_line_error(capsys, "report", tmp_path / "plain", "--out", tmp_path / "r.html")
    assert "is not a saved decomposition" in line and "--model is required" not in line


# --- 6. data read as far as needed ----------------------------------------------------------------


def test_a_saved_dataset_is_not_read_whole(tmp_path, monkeypatch, tiny_model):
    datasets = pytest.importorskip("datasets")
    texts = [f"row {i}: {TEXT[:60]}" for i in range(3000)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    ids = [list(range(i % 50, i % 50 + 20)) for i in range(3000)]
    datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(tmp_path / "ids"))
    (tmp_path / "same.json").write_text(json.dumps(texts))
    expected = cli.load_data(tiny_model, [str(tmp_path / "same.json")], seq_len=16, max_sequences=4)
    whole_column = datasets.Dataset.__getitem__

    def no_whole_column(self, key):
        assert not isinstance(key, str), f"the whole column {key!r} was read"
        return whole_column(self, key)

    monkeypatch.setattr(datasets.Dataset, "__getitem__", no_whole_column)
    assert torch.equal(cli.load_data(tiny_model, [str(tmp_path / "ds")], seq_len=16, max_sequences=4), expected)
    x = cli.load_data(tiny_model, [str(tmp_path / "ids")], seq_len=16, max_sequences=4)
    assert x.tolist() == [r[:16] for r in ids[:4]]


def test_a_jsonl_file_is_read_as_far_as_needed(tmp_path, tiny_model):
    lines = [json.dumps({"text": f"doc {i} " + TEXT[:80]}) for i in range(200)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines + ["not json"]) + "\n")
    (tmp_path / "d.json").write_text(json.dumps([json.loads(line)["text"] for line in lines]))
    x = cli.load_data(tiny_model, [str(tmp_path / "d.jsonl")], seq_len=16, max_sequences=3)
    assert torch.equal(x, cli.load_data(tiny_model, [str(tmp_path / "d.json")], seq_len=16, max_sequences=3))
    with pytest.raises(cli.UserError, match=r"d\.jsonl:201: not a JSON object"):  # reached: refused as before
        cli.load_data(tiny_model, [str(tmp_path / "d.jsonl")], seq_len=16, max_sequences=10000)


# --- 7. .jsonl lines and extensions ---------------------------------------------------------------


def test_jsonl_lines_end_at_newlines_only_and_extensions_match_in_any_case(tmp_path, tiny_model):
    docs = ["alpha\u2028beta gamma", "gamma\x85delta epsilon", "plain\u2029text here"]
    body = "".join(json.dumps({"text": d}, ensure_ascii=False) + end for d, end in zip(docs, ["\n", "\r\n", "\n"]))
    (tmp_path / "u.jsonl").write_text(body, encoding="utf-8", newline="")
    (tmp_path / "U.JSONL").write_text(body, encoding="utf-8", newline="")
    (tmp_path / "u.json").write_text(json.dumps(docs))
    expected = cli.load_data(tiny_model, [str(tmp_path / "u.json")], seq_len=8, max_sequences=100)
    for name in ("u.jsonl", "U.JSONL"):
        assert torch.equal(cli.load_data(tiny_model, [str(tmp_path / name)], seq_len=8, max_sequences=100), expected)


# --- 8. outputs through symlinks ----------------------------------------------------------------


def test_a_report_written_through_a_symlink_can_be_written_again(capsys, tmp_path, saved_dec):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "a" / "link.html"
    link.symlink_to(tmp_path / "b" / "target.html")
    for _ in range(2):
        code, out, err = run(capsys, "report", saved_dec, "--out", link, "--max-sequences", "4", "--n-references", "1",
                             "--quiet")
        assert code == 0, err
    assert link.is_symlink() and (tmp_path / "b" / "target.html").is_file()


def test_a_dangling_symlink_above_an_output_is_named_before_any_work(capsys, tmp_path, saved_dec, no_model_loading):
    os.symlink(tmp_path / "missing", tmp_path / "dl")
    line = one_line_error(capsys, "report", saved_dec, "--out", tmp_path / "dl" / "r.html")
    assert f"{tmp_path / 'dl'} is a symbolic link to {tmp_path / 'missing'}, which does not exist" in line
    line = one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--out",
                          tmp_path / "dl" / "sub" / "dec")
    assert f"{tmp_path / 'dl'} is a symbolic link" in line


def test_a_jsonl_file_with_cr_line_ends_is_read_as_before(tmp_path):
    """Lines split on line feeds only refused a CR-only file as one bad line 1."""
    from l3d_lens.cli import _texts_from_jsonl

    file = tmp_path / "cr.jsonl"
    file.write_bytes(b'{"text": "doc 0"}\r{"text": "doc\\u2028 1 \xe2\x80\xa8"}\r\n{"text": "doc 2"}\n')
    assert list(_texts_from_jsonl(file, "text")) == ["doc 0", "doc\u2028 1 \u2028", "doc 2"]
