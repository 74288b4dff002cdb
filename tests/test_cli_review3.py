"""Third review of the ``l3d-lens`` command: an unwritable output path is refused before any
work; files already at the output names are replaced only when they are l3d-lens's own
unchanged earlier outputs (its manifest) or with --overwrite; the summary of an attention + MLP
decomposition splits each subnetwork between them; error lines keep their whole list of
choices; the printed loss says it is the training loss; whitespace-only text files are
skipped; a paired decomposition's report, --compare on another model and moved recorded data
are refused before any model loads; unused data flags get a note."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

import l3d_lens.cli as cli
from l3d_lens import L3DConfig, decompose
from l3d_lens.cli import MANIFEST, main

from .test_cli import hf_dir  # noqa: F401 - the tiny local GPT-2 fixture
from .test_cli_review import EOT, TINY, one_line_error, run

torch.set_num_threads(1)

EMBEDDED_DEC = ["decompose", "induction", "--components", "blocks.0.attn", "--max-sequences", "16", *TINY]
SMALL_DEMO = ["--n-sequences", "32", "--epochs", "1", "--n-pairs", "4", "--report-sequences", "4", "--quiet"]
PROC = Path("/proc")


@pytest.fixture(scope="module")
def bridge(hf_dir):  # noqa: F811
    return cli.load_model(str(hf_dir), "bridge")


def saved_folder(tmp_path: Path, config: dict, record: dict) -> Path:
    """A folder with a decomposition.json holding ``config`` and a cli_inputs.json (no factors:
    the checks tested here come before anything reads them)."""
    folder = tmp_path / "dec"
    folder.mkdir()
    (folder / "decomposition.json").write_text(json.dumps({"config": config}))
    (folder / "cli_inputs.json").write_text(json.dumps(record))
    return folder


# --- 1. unwritable outputs -------------------------------------------------------------------------


@pytest.mark.skipif(not PROC.is_dir(), reason="needs /proc, where no file can be created (even by root)")
@pytest.mark.parametrize("argv", [
    ["decompose", "induction", "--components", "blocks.0.attn", "--out", PROC / "l3d-lens-test" / "dec"],
    ["decompose", "induction", "--components", "blocks.0.attn", "--out", "OK", "--report", PROC / "r.html"],
    ["demo", "--out", PROC / "l3d-lens-demo"],
    ["report", "some-decomposition", "--out", PROC / "r.html"],
    ["compare", "--out", PROC / "l3d-lens-cmp"],
])
def test_an_unwritable_output_is_refused_before_any_model_loads(capsys, tmp_path, no_model_loading, argv):
    argv = [tmp_path / "ok" if a == "OK" else a for a in argv]
    flag = "--report" if "--report" in argv else "--out"
    line = one_line_error(capsys, *argv, "--quiet")
    assert f"{flag} {PROC}" in line and ": not writable (cannot create a file in /proc" in line, line


def test_a_dangling_symbolic_link_is_refused_before_any_model_loads(capsys, tmp_path, no_model_loading):
    """It was taken for a folder to be made (its parent writable), and failed after training."""
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "sub")
    line = one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--out",
                          tmp_path / "dangling", "--quiet")
    assert f"--out {tmp_path / 'dangling'} is a symbolic link to {tmp_path / 'nowhere' / 'sub'}, which does not " \
           f"exist" in line, line


def test_a_read_only_folder_is_refused(capsys, tmp_path, no_model_loading):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod does not stop writing")
        line = one_line_error(capsys, "compare", "--out", ro / "cmp", "--quiet")
        assert f"--out {ro / 'cmp'}: not writable (no permission to write in {ro})" in line
    finally:
        ro.chmod(0o700)


def test_the_writability_check_leaves_nothing_behind(capsys, tmp_path, no_model_loading):
    """The check creates and deletes a file; a folder still to be made is not made by it."""
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(AssertionError, match="a model was loaded"):  # every check passed
        main(["decompose", "induction", "--components", "blocks.0.attn", "--out", str(tmp_path / "new" / "dec"),
              "--report", str(tmp_path / "r.html"), "--quiet"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


# --- 2. files already at the output names ------------------------------------------------------------


@pytest.mark.parametrize("argv, target", [
    (["decompose", "induction", "--components", "blocks.0.attn", "--out", "OUT"], "cli_inputs.json"),
    (["decompose", "induction", "--components", "blocks.0.attn", "--out", "OUT"], "decomposition.json"),
    (["decompose", "induction", "--components", "blocks.0.attn", "--out", "OUT/sub", "--report", "OUT/r.html"],
     "r.html"),
    (["demo", "--out", "OUT"], "report.html"),
    (["demo", "--out", "OUT"], "comparison_heads.csv"),
    (["demo", "--out", "OUT"], "decomposition/factors.safetensors"),
    (["compare", "--out", "OUT"], "agreement.csv"),
    (["report", "some-decomposition", "--out", "OUT/l3d_report.html"], "l3d_report.html"),
])
def test_a_user_file_at_an_output_name_is_refused_and_left_alone(capsys, tmp_path, no_model_loading, argv, target):
    out = tmp_path / "out"
    user = out / target
    user.parent.mkdir(parents=True)
    user.write_bytes(b"USER DATA\n")
    argv = [str(a).replace("OUT", str(out)) for a in argv]
    line = one_line_error(capsys, *argv, "--quiet")
    assert f"would overwrite {user} (not recorded in {MANIFEST}: another program" in line and "--overwrite" in line, line
    assert user.read_bytes() == b"USER DATA\n"


def test_a_file_named_like_the_manifest_that_is_not_one_is_refused(capsys, tmp_path, no_model_loading):
    (tmp_path / MANIFEST).write_text("my notes")
    line = one_line_error(capsys, "compare", "--out", tmp_path, "--quiet")
    assert f"would overwrite {tmp_path / MANIFEST}" in line
    assert (tmp_path / MANIFEST).read_text() == "my notes"


def test_a_folder_at_an_output_name_is_refused_even_with_overwrite(capsys, tmp_path, no_model_loading):
    (tmp_path / "heads.csv").mkdir()
    line = one_line_error(capsys, "compare", "--out", tmp_path, "--overwrite", "--quiet")
    assert line.endswith(f"{tmp_path / 'heads.csv'} is a folder, where l3d-lens would write a file"), line


def test_rerunning_decompose_and_report_replaces_their_own_outputs_only(capsys, tmp_path):
    out = tmp_path / "dec"
    (tmp_path / "notes.txt").write_text("mine")
    for _ in range(2):  # the second run replaces the first one's files
        code, stdout, err = run(capsys, *EMBEDDED_DEC, "--out", out, "--report", tmp_path / "r.html")
        assert code == 0, err
        assert "(training, mean over the last epoch)" in stdout
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(manifest) == ["cli_inputs.json", "decomposition.json", "factors.safetensors"]
    assert sorted(json.loads((tmp_path / MANIFEST).read_text())) == ["r.html"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    report = ["report", out, "--out", tmp_path / "again.html", "--max-sequences", "4", "--n-references", "1", "--quiet"]
    for _ in range(2):
        code, _, err = run(capsys, *report)
        assert code == 0, err

    (out / "cli_inputs.json").write_text((out / "cli_inputs.json").read_text() + " ")  # an edited earlier output
    line = one_line_error(capsys, *EMBEDDED_DEC, "--out", out)
    assert f"would overwrite {out / 'cli_inputs.json'} " in line
    code, _, err = run(capsys, *EMBEDDED_DEC, "--out", out, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "cli_inputs.json").read_text())["model"] == "induction"


def test_overwrite_replaces_a_user_file(capsys, tmp_path):
    out = tmp_path / "dec"
    out.mkdir()
    (out / "cli_inputs.json").write_text("USER DATA")
    code, _, err = run(capsys, *EMBEDDED_DEC, "--out", out, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "cli_inputs.json").read_text())["model"] == "induction"
    assert json.loads((out / MANIFEST).read_text())["cli_inputs.json"] == cli._sha256(out / "cli_inputs.json")


def test_rerunning_the_demo_into_its_folder_works(capsys, tmp_path):
    for _ in range(2):
        code, _, err = run(capsys, "demo", "--out", tmp_path, *SMALL_DEMO)
        assert code == 0, err
    assert sorted(json.loads((tmp_path / MANIFEST).read_text())) == ["comparison_heads.csv", "report.html"]
    (tmp_path / "report.html").write_text("edited")
    line = one_line_error(capsys, "demo", "--out", tmp_path, *SMALL_DEMO)
    assert f"would overwrite {tmp_path / 'report.html'} " in line
    assert (tmp_path / "report.html").read_text() == "edited"


# --- 3. the summary of attention + MLP ---------------------------------------------------------------


def test_the_summary_splits_attention_and_mlp(bridge):
    data = torch.randint(0, EOT, (8, 8))
    cfg = L3DConfig(components=["blocks.0.attn", "blocks.0.mlp"], n_subnetworks=3, rank=1, epochs=1, batch_size=4,
                    include_biases=False)
    dec = decompose(bridge, data, cfg)
    lines = cli._summary_lines(dec, data)
    assert lines[0].split()[:5] == ["subnet", "P_act", "attn", "mlp", "other"]
    df = dec.attribution()
    by_part = df.groupby([df["subnetwork"], df["weight"].map(cli._part)])["share"].sum().unstack(fill_value=0.0)
    heads = dec.head_attribution().groupby(["subnetwork", "layer", "head"], as_index=False)["share"].sum()
    units = pd.concat([heads.assign(unit=[f"L{r.layer}H{r.head}" for r in heads.itertuples()]),
                       dec.neuron_attribution().pipe(lambda f: f.assign(unit=[f"L{r.layer}N{r.neuron}"
                                                                               for r in f.itertuples()]))])
    assert len(lines) == 4
    for line in lines[1:]:
        k, _, attn, mlp, other, *top = line.replace(",", "").split()
        assert float(attn) == pytest.approx(by_part.loc[int(k), "attn"], abs=0.006)
        assert float(mlp) == pytest.approx(by_part.loc[int(k), "mlp"], abs=0.006)
        assert float(other) == 0.0
        expected = units[units.subnetwork == int(k)].nlargest(3, "share")
        assert top[::2] == list(expected["unit"]), (line, expected)  # heads and neurons ranked together


# --- 4. whole error lines ------------------------------------------------------------------------------


def test_an_error_line_keeps_its_whole_list_of_choices(capsys, tmp_path, no_model_loading):
    line = one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--set", "aux_cof=0.1",
                          "--out", tmp_path / "o", "--quiet")
    assert "'aux_coef'" in line and line.endswith("'seed', 'top_k']"), line


# --- 6. blank text files -------------------------------------------------------------------------------


def test_a_whitespace_only_text_file_is_skipped(bridge, tmp_path):
    blank, corpus = tmp_path / "blank.txt", tmp_path / "corpus.txt"
    blank.write_text("\n\n   \n\n")
    corpus.write_text("the quick brown fox jumps over the lazy dog")
    x = cli.load_data(bridge, [str(blank), str(corpus)], seq_len=16, max_sequences=1)
    assert x[0].tolist() == [EOT, *b"the quick brown"]


# --- 7. paired decompositions ----------------------------------------------------------------------------


def test_report_refuses_a_paired_decomposition_before_loading(capsys, tmp_path, no_model_loading):
    folder = saved_folder(tmp_path, {"reference": "paired", "device": None}, {"model": "induction"})
    line = one_line_error(capsys, "report", folder, "--out", tmp_path / "r.html", "--quiet")
    assert "reference='paired'" in line and "l3d_lens.report(dec, data, reference=...)" in line, line


# --- 8. checks before loading, notes on unused flags -------------------------------------------------------


def test_compare_refuses_another_model_before_loading_it(capsys, tmp_path, no_model_loading):
    line = one_line_error(capsys, "compare", tmp_path, "--quiet")
    assert "available for the embedded model only" in line


def test_report_compare_refuses_another_model_before_loading_it(capsys, tmp_path, no_model_loading):
    folder = saved_folder(tmp_path, {"device": None}, {"model": str(tmp_path / "my-gpt2")})
    line = one_line_error(capsys, "report", folder, "--compare", "--out", tmp_path / "r.html", "--quiet")
    assert "available for the embedded model only" in line


def test_moved_recorded_data_names_the_flag_before_loading(capsys, tmp_path, no_model_loading):
    gone = str(tmp_path / "moved" / "corpus.txt")
    folder = saved_folder(tmp_path, {"device": None}, {"model": "induction", "data": [gone]})
    line = one_line_error(capsys, "report", folder, "--out", tmp_path / "r.html", "--quiet")
    assert f"data {gone} does not exist (recorded in {folder / 'cli_inputs.json'}; pass --data" in line, line
    line = one_line_error(capsys, "report", folder, "--data", tmp_path / "nope.txt", "--out", tmp_path / "r.html")
    assert line.endswith(f"data {tmp_path / 'nope.txt'} does not exist"), line


@pytest.mark.parametrize("paths, ignored", [
    ([], ["--seq-len", "--text-column", "--split"]),
    (["tokens.pt"], ["--seq-len", "--text-column", "--split"]),
    (["corpus.txt"], ["--text-column", "--split"]),
    (["data.jsonl"], ["--split"]),
    (["DIR"], []),
])
def test_unused_data_flags_get_a_note(capsys, tmp_path, paths, ignored):
    paths = [str(tmp_path) if p == "DIR" else p for p in paths]
    args = argparse.Namespace(seq_len=8, text_column="body", split="test")
    cli._note_unused_data_flags(args, paths)
    notes = capsys.readouterr().err.strip().splitlines()
    assert [n.split()[2] for n in notes] == ignored
    assert all(n.startswith("l3d-lens: note: --") and "is ignored" in n for n in notes)


def test_decompose_notes_a_seq_len_the_embedded_data_ignore(capsys, tmp_path):
    code, _, err = run(capsys, *EMBEDDED_DEC, "--seq-len", "8", "--out", tmp_path / "dec")
    assert code == 0, err
    assert "l3d-lens: note: --seq-len 8 is ignored: it does not apply to the data (the embedded model's" in err