"""Review fixes of the ``l3d-lens`` command: text packing adds exactly one BOS per sequence
and one end-of-text token per document; a device from --config/--set is checked like
--device; counts are ints >= 1 and empty data is refused; output paths and counts are
checked before any model is loaded or trained; an architecture TransformerLens does not
support is a one-line error; the data loader refuses bool token ids, non-string texts, a
missing explicit --text-column, and reads .json arrays; the record names the embedded model
even when a folder of that name exists; the embedded model checks its probe logits on load;
a weight mismatch names --no-check-weights; an MLP-only decomposition prints no heads table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import l3d_lens.cli as cli
from l3d_lens.cli import main
from l3d_lens.zoo import induction

from .helpers import HAS_HOOKED
from .test_cli import hf_dir  # noqa: F401 - the tiny local GPT-2 fixture

torch.set_num_threads(1)

KINDS = (["hooked"] if HAS_HOOKED else []) + ["bridge"]
EOT = 256  # the tiny GPT-2's <|endoftext|>: both its BOS and its EOS
TINY = ["--n-subnetworks", "2", "--rank", "1", "--epochs", "1", "--quiet"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, command: str, *argv) -> str:
    """Run ``command argv`` expecting exit 2 and one error line, no traceback (other stderr
    lines: progress bars of transformers/datasets while loading); return the error line."""
    code, _, err = run(capsys, command, *argv)
    lines = [line for line in err.strip().splitlines() if line.startswith("l3d-lens")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"l3d-lens {command}: error: ") and lines[0] == err.strip().splitlines()[-1], err
    return lines[0]


def argparse_error(capsys, argv) -> str:
    """Run argv expecting an argparse error (exit 2); return the error line."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def tiny(hf_dir):  # noqa: F811
    """The tiny GPT-2 loaded through TransformerLens (bridge, or HookedTransformer where it exists)."""
    return {kind: cli.load_model(str(hf_dir), kind) for kind in KINDS}


# --- 1. text packing ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_text_packing_adds_one_bos_per_sequence_and_one_eos_per_document(tiny, tmp_path, kind):
    model = tiny[kind]
    assert model.tokenizer("ab")["input_ids"][0] == EOT  # TransformerLens makes the tokenizer prepend BOS
    docs = [f"sample number {i}: the quick brown fox" for i in range(12)]
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    x = cli.load_data(model, [str(data)], seq_len=16, max_sequences=6)
    stream = [i for d in docs for i in [*d.encode(), EOT]]  # byte-level vocabulary: id = byte
    assert x.shape == (6, 16)
    assert (x[:, 0] == EOT).all()
    assert x[:, 1:].reshape(-1).tolist() == stream[: 6 * 15]
    assert x[0, 1] != EOT


# --- 2. device from the config ------------------------------------------------------------------


@pytest.mark.parametrize("how, message", [
    (["--set", "device=banana"], "device='banana' is not a device torch knows"),
    (["--set", "device=meta"], "device meta holds no weights"),
    (["--set", "device=3"], "device must be None (the model's device) or a string such as 'cpu'"),
    (["--config", "CFG"], "device='banana' is not a device torch knows"),
])
def test_a_device_from_set_or_config_is_checked_like_the_flag(capsys, tmp_path, no_model_loading, how, message):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"components": ["blocks.0.attn"], "device": "banana"}))
    how = [str(cfg) if a == "CFG" else a for a in how]
    line = one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn", *how,
                          "--out", tmp_path / "o", "--quiet")
    assert message in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_cuda_device_from_set_is_one_line_without_cuda(capsys, tmp_path, no_model_loading):
    line = one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--set", "device=cuda",
                          "--out", tmp_path / "o", "--quiet")
    assert "no cuda device is available" in line


def test_the_model_goes_to_the_configured_device(capsys, tmp_path, monkeypatch):
    seen = []

    def fake_load(spec, model_class="auto", device=None):
        seen.append(device)
        raise cli.UserError("stop here")

    monkeypatch.setattr(cli, "load_model", fake_load)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"components": ["blocks.0.attn"], "device": "cpu"}))
    one_line_error(capsys, "decompose", "induction", "--config", cfg, "--out", tmp_path / "o", "--quiet")
    one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--set", "device=cpu",
                   "--out", tmp_path / "o", "--quiet")
    assert seen == ["cpu", "cpu"]


# --- 3. counts and empty data ------------------------------------------------------------------


@pytest.mark.parametrize("argv, flag", [
    (["decompose", "induction", "--components", "blocks.0.attn", "--out", "o", "--max-sequences", "0"], "--max-sequences"),
    (["decompose", "induction", "--components", "blocks.0.attn", "--out", "o", "--max-sequences", "-1"],
     "--max-sequences"),
    (["demo", "--n-sequences", "-1"], "--n-sequences"),
    (["demo", "--n-pairs", "0"], "--n-pairs"),
    (["demo", "--report-sequences", "0"], "--report-sequences"),
    (["compare", "--n-pairs", "-3"], "--n-pairs"),
    (["compare", "--n-pairs", "two"], "--n-pairs"),
    (["report", "somewhere", "--max-sequences", "-1"], "--max-sequences"),
    (["report", "somewhere", "--n-references", "0"], "--n-references"),
    (["report", "somewhere", "--n-pairs", "0"], "--n-pairs"),
])
def test_counts_must_be_positive_ints(capsys, no_model_loading, argv, flag):
    line = argparse_error(capsys, argv)
    assert line.startswith(f"l3d-lens {argv[0]}: error: argument {flag}: must be an int >= 1, got "), line


def test_empty_data_is_refused(capsys, tmp_path):
    model = induction.load()
    model._l3d_embedded = True
    empty = tmp_path / "empty.pt"
    torch.save(torch.zeros(0, 10, dtype=torch.long), empty)
    line = one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--data", empty,
                          "--out", tmp_path / "o", "--quiet")
    assert "holds no token ids" in line
    torch.save(torch.zeros(3, 0, dtype=torch.long), empty)
    with pytest.raises(cli.UserError, match="holds no token ids"):
        cli.load_data(model, [str(empty)], seq_len=None, max_sequences=8)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    with pytest.raises(cli.UserError, match="no text or token ids"):
        cli.load_data(model, [str(blank)], seq_len=None, max_sequences=8)
    ids = tmp_path / "ids.pt"
    torch.save(torch.ones(5, 10, dtype=torch.long), ids)
    for n in (0, -1):
        with pytest.raises(cli.UserError, match="max_sequences must be an int >= 1"):
            cli.load_data(model, [str(ids)], seq_len=None, max_sequences=n)


# --- 4. outputs checked before the work ------------------------------------------------------------


def test_output_paths_are_checked_before_loading_or_training(capsys, tmp_path, no_model_loading):
    afile = tmp_path / "afile"
    afile.write_text("hi")
    line = one_line_error(capsys, "compare", "--n-pairs", "4", "--quiet", "--out", afile)
    assert "--out" in line and "not a folder" in line
    line = one_line_error(capsys, "demo", "--out", afile, "--quiet")
    assert "--out" in line and "not a folder" in line
    line = one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--out", tmp_path / "o",
                          "--report", tmp_path / "r.txt", "--quiet")
    assert "must end in .html" in line
    adir = tmp_path / "adir.html"
    adir.mkdir()
    line = one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--out", tmp_path / "o",
                          "--report", adir, "--quiet")
    assert "is a folder" in line
    line = one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--out", afile / "sub",
                          "--quiet")
    assert "not a folder" in line
    line = one_line_error(capsys, "demo", "--epochs", "0", "--out", tmp_path / "d", "--quiet")
    assert "epochs must be an int >= 1" in line


# --- 5. unsupported architectures ------------------------------------------------------------------


def test_an_unsupported_architecture_is_one_line(capsys, tmp_path, hf_dir, monkeypatch):  # noqa: F811
    def unsupported(path, model_class):
        raise NotImplementedError("CTRLLMHeadModel is not currently supported.")

    monkeypatch.setattr(cli, "_boot_local", unsupported)
    line = one_line_error(capsys, "decompose", hf_dir, "--components", "blocks.0.attn", "--out", tmp_path / "o",
                          "--quiet")
    assert "could not load the model in" in line and "CTRLLMHeadModel is not currently supported" in line


@pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer was removed in TransformerLens 4")
def test_a_ctrl_model_as_hooked_transformer_is_one_line(capsys, tmp_path, hf_dir):  # noqa: F811
    from transformers import CTRLConfig, CTRLLMHeadModel

    ctrl = tmp_path / "ctrl"
    torch.manual_seed(0)
    CTRLLMHeadModel(CTRLConfig(n_layer=1, n_embd=16, n_head=2, dff=32, vocab_size=257, n_positions=32)).save_pretrained(ctrl)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_dir / f).is_file():
            shutil.copy(hf_dir / f, ctrl / f)
    line = one_line_error(capsys, "decompose", ctrl, "--model-class", "hooked", "--components", "blocks.0.attn",
                          "--out", tmp_path / "o", "--quiet")
    assert "could not load the model in" in line and "not currently supported" in line


# --- 6. the data loader ----------------------------------------------------------------------------


def test_bool_token_ids_are_refused(capsys, tmp_path):
    bools = tmp_path / "bool.pt"
    torch.save(torch.ones(4, 10, dtype=torch.bool), bools)
    line = one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--data", bools,
                          "--out", tmp_path / "o", "--quiet")
    assert "expected an integer tensor of token ids" in line and "torch.bool" in line


@pytest.mark.parametrize("value", [5, ["a"]])
def test_jsonl_texts_must_be_strings(tiny, tmp_path, value):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a fine document"}) + "\n\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(cli.UserError, match=r"d\.jsonl:3: the 'text' field is .* not a string"):
        cli.load_data(tiny["bridge"], [str(data)], seq_len=8, max_sequences=4)


def test_an_explicit_text_column_is_not_replaced_by_token_ids(capsys, tmp_path, tiny, hf_dir):  # noqa: F811
    import datasets

    ds = tmp_path / "ds_ids"
    datasets.Dataset.from_dict({"input_ids": [list(range(i, i + 20)) for i in range(30)],
                                "body": ["x y"] * 30}).save_to_disk(ds)
    model = tiny["bridge"]
    with pytest.raises(cli.UserError, match=r"no column 'text'; it has \['input_ids', 'body'\]"):
        cli.load_data(model, [str(ds)], seq_len=16, max_sequences=4, text_column="text")
    x = cli.load_data(model, [str(ds)], seq_len=16, max_sequences=4)  # no column named: the token ids
    assert x[1].tolist() == list(range(1, 17))
    line = one_line_error(capsys, "decompose", hf_dir, "--data", ds, "--text-column", "text", "--components",
                          "blocks.0.attn", "--out", tmp_path / "o", "--quiet")
    assert "no column 'text'" in line
    numbers = tmp_path / "ds_num"
    datasets.Dataset.from_dict({"text": [1, 2, 3]}).save_to_disk(numbers)
    with pytest.raises(cli.UserError, match="row 0 of column 'text' is 1, not a string"):
        cli.load_data(model, [str(numbers)], seq_len=8, max_sequences=4)
    # blank and missing rows (WikiText has many) are skipped, as TokenStream skips them
    sparse, full = tmp_path / "ds_sparse", tmp_path / "ds_full"
    words = [f"alpha beta gamma {i} delta" for i in range(12)]
    datasets.Dataset.from_dict({"text": [w for t in words for w in (t, None, " ")]}).save_to_disk(sparse)
    datasets.Dataset.from_dict({"text": words}).save_to_disk(full)
    assert torch.equal(cli.load_data(model, [str(sparse)], seq_len=8, max_sequences=4),
                       cli.load_data(model, [str(full)], seq_len=8, max_sequences=4))


def test_json_arrays_are_read_as_documents(tiny, tmp_path):
    model = tiny["bridge"]
    docs = [f"document {i} says something" for i in range(8)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(docs))
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps([{"text": d, "id": i} for i, d in enumerate(docs)]))
    expected = cli.load_data(model, [str(jsonl)], seq_len=12, max_sequences=8)
    assert torch.equal(cli.load_data(model, [str(strings)], seq_len=12, max_sequences=8), expected)
    assert torch.equal(cli.load_data(model, [str(objects)], seq_len=12, max_sequences=8), expected)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"text": "one"}))
    with pytest.raises(cli.UserError, match="a JSON array of strings or of objects with a 'text' field"):
        cli.load_data(model, [str(bad)], seq_len=12, max_sequences=8)
    bad.write_text(json.dumps(["fine", {"body": "x"}]))
    with pytest.raises(cli.UserError, match=r"bad\.json: item 1: .*'text'"):
        cli.load_data(model, [str(bad)], seq_len=12, max_sequences=8)
    bad.write_text("[1, 2")
    with pytest.raises(cli.UserError, match="invalid JSON"):
        cli.load_data(model, [str(bad)], seq_len=12, max_sequences=8)


# --- 7 and 9. a saved embedded decomposition ---------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_dec(tmp_path_factory):
    """A tiny decomposition of the embedded model, made from a working directory holding a
    folder named ``induction``."""
    import os

    work = tmp_path_factory.mktemp("cwd")
    (work / "induction").mkdir()
    before = os.getcwd()
    os.chdir(work)
    try:
        code = main(["decompose", "induction", "--components", "blocks.0.attn", "--max-sequences", "16", "--out",
                     "dec", *TINY])
    finally:
        os.chdir(before)
    assert code == 0
    return work / "dec"


def test_the_record_names_the_embedded_model_not_a_folder_of_that_name(capsys, embedded_dec, tmp_path):
    record = json.loads((embedded_dec / "cli_inputs.json").read_text())
    assert record["model"] == "induction"
    code, _, err = run(capsys, "report", embedded_dec, "--out", tmp_path / "r.html", "--max-sequences", "4",
                       "--n-references", "1", "--quiet")
    assert code == 0, err


def test_a_weight_mismatch_names_the_flag(capsys, embedded_dec, tmp_path):
    dec = tmp_path / "dec"
    shutil.copytree(embedded_dec, dec)
    meta = json.loads((dec / "decomposition.json").read_text())
    meta["fingerprint"]["sha256"] = "0" * 64
    (dec / "decomposition.json").write_text(json.dumps(meta))
    line = one_line_error(capsys, "report", dec, "--out", tmp_path / "r.html", "--quiet")
    assert "--no-check-weights" in line and "check_weights=False" not in line


def test_an_mlp_decomposition_prints_neurons_not_heads(capsys, tmp_path, hf_dir):  # noqa: F811
    text = tmp_path / "corpus.txt"
    text.write_text("a small corpus of text for a tiny model. " * 30)
    code, out, err = run(capsys, "decompose", hf_dir, "--data", text, "--components", "blocks.0.mlp", "--seq-len", "16",
                         "--max-sequences", "8", "--out", tmp_path / "dec", *TINY)
    assert code == 0, err
    assert "top heads" not in out and "top neurons" in out
    assert "L0N" in out


# --- 8. the embedded model's probe ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_embedded_model_checks_its_probe_logits_on_load(tmp_path, monkeypatch, kind):
    assets = tmp_path / "induction"
    shutil.copytree(induction._asset_dir("default"), assets)
    meta = json.loads((assets / "meta.json").read_text())
    meta["probe_logits_first"][3] += 0.5
    (assets / "meta.json").write_text(json.dumps(meta))
    monkeypatch.setattr(induction, "_asset_dir", lambda variant="default": Path(assets))
    with pytest.raises(RuntimeError, match="probe logits"):
        induction.load(kind)


def _with_saved_device(embedded_dec, tmp_path, device) -> Path:
    dec = tmp_path / "dec"
    shutil.copytree(embedded_dec, dec)
    meta = json.loads((dec / "decomposition.json").read_text())
    meta["config"]["device"] = device
    (dec / "decomposition.json").write_text(json.dumps(meta))
    return dec


def test_a_saved_device_this_machine_lacks_loads_where_the_model_loads_with_a_note(capsys, embedded_dec, tmp_path):
    """A decomposition computed on a GPU reports on a machine without one: the factors go where
    the model loads and stderr says so (no JSON to edit); with --device there is no note."""
    dec = _with_saved_device(embedded_dec, tmp_path, "cuda:99")
    argv = ("report", dec, "--out", tmp_path / "r.html", "--max-sequences", "4", "--n-references", "1", "--quiet")
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert f"{dec} was computed on cuda:99" in err and "loading it where the model loads" in err
    code, _, err = run(capsys, *argv, "--device", "cpu")
    assert code == 0 and "computed on" not in err, err


def test_a_saved_device_torch_cannot_name_loads_where_the_model_loads_with_a_warning(capsys, embedded_dec,
                                                                                    tmp_path):
    """A device of a torch extension this torch lacks ('npu:0'): loaded where the model loads, as a
    device this machine lacks; one that is not a string is one error line before the model loads."""
    dec = _with_saved_device(embedded_dec, tmp_path, "npu:0")
    for extra in ((), ("--device", "cpu")):
        with pytest.warns(UserWarning, match=r"computed on device 'npu:0', which this torch does not know"):
            code, _, err = run(capsys, "report", dec, "--out", tmp_path / "r.html", "--max-sequences", "4",
                               "--n-references", "1", "--quiet", *extra)
        assert code == 0, err


def test_a_saved_device_that_is_not_a_string_is_one_line_before_the_model_loads(capsys, embedded_dec, tmp_path,
                                                                              no_model_loading):
    dec = _with_saved_device(embedded_dec, tmp_path, 3)
    line = one_line_error(capsys, "report", dec, "--out", tmp_path / "r.html", "--quiet")
    assert "the saved decomposition's device 3" in line and 'set "device" to null' in line


def test_the_summary_lists_only_heads_the_subnetwork_lies_in(capsys, tmp_path):
    """One decomposed head (layer 1, head 2): each subnetwork's top heads are that head alone, not
    two more with share 0 from the rest of the model."""
    import re

    code, out, err = run(capsys, "decompose", "induction", "--components", "blocks.1.attn[2]", "--max-sequences",
                         "16", "--out", tmp_path / "dec", *TINY[:-1])
    assert code == 0, err
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+\d\.\d{3}\s", line)]
    assert len(rows) == 2, out
    for line in rows:
        assert re.findall(r"L\d+H\d+", line) == ["L1H2", "L1H2"], line


@pytest.mark.parametrize("value, biases", [("False", False), ("false", False), ("True", True)])
def test_set_include_biases_takes_python_and_json_booleans(capsys, tmp_path, value, biases):
    """--set include_biases=False stored the string 'False', which counts as true: the biases were
    decomposed against the user's word. Python's True/False/None now read as JSON's."""
    code, _, err = run(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--set",
                       f"include_biases={value}", "--max-sequences", "8", "--out", tmp_path / "dec", *TINY)
    assert code == 0, err
    meta = json.loads((tmp_path / "dec" / "decomposition.json").read_text())
    assert meta["config"]["include_biases"] is biases
    assert any(w.endswith(".b_Q") for w in meta["weights"]) is biases


def test_include_biases_must_be_a_bool():
    import l3d_lens

    for bad in ("False", "no", 0, None):
        with pytest.raises(ValueError, match=r"include_biases must be True or False"):
            l3d_lens.L3DConfig(components="blocks.0.attn", include_biases=bad)


def test_null_and_blank_texts_are_skipped_by_every_reader_as_by_token_stream(tiny, tmp_path):
    """The CLI's .jsonl and .json readers refused a null text, which TokenStream and the dataset
    readers skip: the same file now gives the same tokens with or without its null and blank rows."""
    model = tiny["bridge"]
    docs = [f"document {i} says something" for i in range(8)]
    sparse = [d for doc in docs for d in (doc, None, "  ")]
    files = {"full.jsonl": "\n".join(json.dumps({"text": d}) for d in docs),
             "sparse.jsonl": "\n".join(json.dumps({"text": d}) for d in sparse),
             "sparse_objects.json": json.dumps([{"text": d} for d in sparse]),
             "sparse_strings.json": json.dumps(sparse)}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    expected = cli.load_data(model, [str(tmp_path / "full.jsonl")], seq_len=12, max_sequences=8)
    for name in ("sparse.jsonl", "sparse_objects.json", "sparse_strings.json"):
        assert torch.equal(cli.load_data(model, [str(tmp_path / name)], seq_len=12, max_sequences=8), expected), name
