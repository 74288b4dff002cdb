"""Review fixes of the ``l3d-lens`` command: the record names a hub model as a name even when
the output folder takes that name, and ``report`` loads it so; a tokenizer that turns text
into no tokens (a model folder without its tokenizer files) is named as the cause; a GPT-2
config saved without ``n_ctx`` loads as a HookedTransformer, and a failed conversion suggests
--model-class bridge; data files, --seq-len's lower bound and a missing --data are checked
before the model loads; ``report --data`` does not take the recorded split, column or
sequence length of other data; a decomposition of a HookedTransformer reported on a bridge
(or the other way) names the --model-class it needs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import l3d_lens.cli as cli

from .helpers import HAS_HOOKED
from .test_cli import hf_dir  # noqa: F401 - the tiny local GPT-2 fixture
from .test_cli_review import one_line_error, run

torch.set_num_threads(1)

TINY = ["--components", "blocks.0.attn", "--n-subnetworks", "2", "--rank", "1", "--epochs", "1", "--quiet"]
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def saved_dataset_dict(folder: Path, splits: tuple[str, ...]) -> Path:
    datasets = pytest.importorskip("datasets")
    parts = {name: datasets.Dataset.from_dict({"text": [f"{name} {i}: {TEXT}" for i in range(4)]}) for name in splits}
    datasets.DatasetDict(parts).save_to_disk(str(folder))
    return folder


# --- 1. a hub name whose output folder bears it ------------------------------------------------


def test_a_hub_model_is_recorded_by_name_even_where_the_output_folder_takes_it(capsys, tmp_path, monkeypatch, corpus,
                                                                               hf_dir):  # noqa: F811
    """``decompose NAME --out NAME``: the folder NAME exists once saved; the record must still name
    the hub model (not the folder as a local model), and ``report`` load it from the hub."""
    loaded = []

    def from_hub(name, model_class):  # the hub, offline: the tiny GPT-2
        loaded.append(name)
        return cli._load_local(hf_dir, "bridge")

    monkeypatch.setattr(cli, "_load_named", from_hub)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "decompose", "tiny-hub-model", "--out", "tiny-hub-model", "--data", corpus,
                       "--seq-len", "16", "--max-sequences", "8", *TINY)
    assert code == 0, err
    record = json.loads((tmp_path / "tiny-hub-model" / cli.RECORD).read_text())
    assert record["model"] == "tiny-hub-model" and record["model_source"] == "named"
    code, _, err = run(capsys, "report", "tiny-hub-model", "--out", "r.html", "--max-sequences", "4", "--quiet")
    assert code == 0, err
    assert loaded == ["tiny-hub-model", "tiny-hub-model"]


# --- 2. a tokenizer that gives no tokens -------------------------------------------------------


class NoVocabulary:
    """What TransformerLens attaches to a model folder without tokenizer files: one entry,
    no tokens for any text."""

    bos_token_id = eos_token_id = 0

    def __len__(self):
        return 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": []}


def test_text_a_tokenizer_turns_into_no_tokens_is_named_as_the_cause():
    model = SimpleNamespace(tokenizer=NoVocabulary())
    with pytest.raises(cli.UserError) as e:
        cli._pack(model, ["", TEXT, "   "], 32, 8)
    message = str(e.value)
    assert "turns the text into no tokens" in message and "NoVocabulary of 1 entries" in message
    assert "tokenizer.json, or vocab.json and merges.txt" in message and "token ids (.pt)" in message
    with pytest.raises(cli.UserError, match="the data give 0 tokens"):  # blank text alone: as before
        cli._pack(model, ["", "  "], 32, 8)


# --- 3. --model-class hooked on a config without n_ctx -------------------------------------------


@pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer was removed in TransformerLens 4")
def test_hooked_loads_a_gpt2_config_saved_without_n_ctx(tmp_path, hf_dir):  # noqa: F811
    folder = shutil.copytree(hf_dir, tmp_path / "gpt2-no-n-ctx")
    config = json.loads((folder / "config.json").read_text())
    config.pop("n_ctx", None)  # as current transformers save a GPT-2: n_positions only
    (folder / "config.json").write_text(json.dumps(config))
    written = (folder / "config.json").read_text()
    model = cli.load_model(str(folder), "hooked")
    assert type(model).__name__ == "HookedTransformer"
    assert model.cfg.n_ctx == config["n_positions"] and model.cfg.model_name == "gpt2-no-n-ctx"
    assert model.cfg.tokenizer_name == str(folder)  # not the deleted temporary copy of the config
    assert (folder / "config.json").read_text() == written  # the user's files are left alone
    reference = cli.load_model(str(hf_dir), "hooked")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer was removed in TransformerLens 4")
def test_a_failed_hooked_conversion_suggests_the_bridge(monkeypatch, hf_dir):  # noqa: F811
    def conversion_fails(path, model_class):
        raise AttributeError("'OddConfig' object has no attribute 'n_inner_size'")

    monkeypatch.setattr(cli, "_boot_local", conversion_fails)
    with pytest.raises(cli.UserError) as e:
        cli.load_model(str(hf_dir), "hooked")
    assert "'OddConfig' object has no attribute 'n_inner_size'" in str(e.value)
    assert "--model-class bridge" in str(e.value)


# --- 4. data checks before the model loads --------------------------------------------------------


def bad_data(tmp_path: Path, kind: str) -> list:
    """Flags naming data that is wrong in a way no model is needed to see."""
    if kind == "jsonl":
        (tmp_path / "bad.jsonl").write_text('{"text": "a"\n')
        return ["--data", tmp_path / "bad.jsonl"]
    if kind == "json":
        (tmp_path / "bad.json").write_text('["a" "b"]')
        return ["--data", tmp_path / "bad.json"]
    if kind == "latin":
        (tmp_path / "latin.txt").write_bytes("café au lait".encode("latin-1"))
        return ["--data", tmp_path / "latin.txt"]
    if kind == "float":
        torch.save(torch.rand(3, 4), tmp_path / "float.pt")
        return ["--data", tmp_path / "float.pt"]
    if kind == "column":
        (tmp_path / "d.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
        return ["--data", tmp_path / "d.jsonl", "--text-column", "body"]
    if kind == "split":
        return ["--data", saved_dataset_dict(tmp_path / "dd", ("train", "validation")), "--split", "test"]
    (tmp_path / "c.txt").write_text(TEXT)
    return ["--data", tmp_path / "c.txt", "--seq-len", kind]


@pytest.mark.parametrize("kind, message", [
    ("jsonl", "bad.jsonl:1: not a JSON object with a 'text' field"),
    ("json", "bad.json: invalid JSON"),
    ("latin", "latin.txt: not a UTF-8 text file"),
    ("float", "float.pt: expected an integer tensor of token ids [n, seq], got a torch.float32 tensor"),
    ("column", "d.jsonl:1: not a JSON object with a 'body' field"),
    ("split", "dd: no split 'test'; it has ['train', 'validation']"),
    ("1", "--seq-len must be at least 2 (and at most the model's n_ctx), got 1"),
    ("-5", "--seq-len must be at least 2 (and at most the model's n_ctx), got -5"),
])
def test_bad_data_stops_decompose_before_the_model_loads(capsys, tmp_path, no_model_loading, hf_dir, kind,  # noqa: F811
                                                         message):
    line = one_line_error(capsys, "decompose", hf_dir, *bad_data(tmp_path, kind), "--out", tmp_path / "o", *TINY)
    assert message in line


@pytest.mark.parametrize("kind", ["json", "float", "1"])
def test_bad_data_stops_report_before_the_model_loads(capsys, tmp_path, no_model_loading, hf_dir, kind):  # noqa: F811
    folder = tmp_path / "dec"
    folder.mkdir()
    (folder / cli.RECORD).write_text(json.dumps({"model": str(hf_dir), "model_source": "local", "data": []}))
    line = one_line_error(capsys, "report", folder, *bad_data(tmp_path, kind), "--out", tmp_path / "r.html")
    assert ("--seq-len must be at least 2" if kind == "1" else "bad.json" if kind == "json" else "float.pt") in line


def test_report_of_another_model_without_data_stops_before_it_loads(capsys, tmp_path, no_model_loading,
                                                                    hf_dir):  # noqa: F811
    """The embedded model's record has no data; with --model another model needs --data."""
    folder = tmp_path / "dec"
    folder.mkdir()
    (folder / cli.RECORD).write_text(json.dumps({"model": "induction", "model_class": "auto", "data": []}))
    line = one_line_error(capsys, "report", folder, "--model", hf_dir, "--out", tmp_path / "r.html")
    assert "--data is required for this model" in line


# --- 5. report --data: the recorded split, column and length stay with the recorded data -----------


def test_report_with_other_data_does_not_take_the_recorded_data_settings(capsys, tmp_path, hf_dir):  # noqa: F811
    first = saved_dataset_dict(tmp_path / "dd", ("train", "validation"))
    other = saved_dataset_dict(tmp_path / "dd2", ("test", "train"))
    jsonl = tmp_path / "other.jsonl"
    jsonl.write_text(json.dumps({"text": TEXT}) + "\n")
    code, _, err = run(capsys, "decompose", hf_dir, "--data", first, "--split", "validation", "--text-column", "text",
                       "--seq-len", "16", "--max-sequences", "8", "--out", tmp_path / "dec", *TINY)
    assert code == 0, err
    parser = cli.build_parser()

    def data_of(*flags):
        args = parser.parse_args(["report", str(tmp_path / "dec"), *map(str, flags), "--max-sequences", "4"])
        return cli._load_saved(args)[2]

    assert data_of().shape == (4, 16)  # the recorded data: its split and length
    assert data_of("--data", other).shape == (4, 32)  # other data: its train split, the default length
    assert data_of("--data", other, "--seq-len", "8").shape == (4, 8)
    assert data_of("--data", jsonl).shape[1] == 32
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ("min(32, n_ctx)", "text;", "train, else the first"):
        assert f"the one recorded with the decomposition's data unless --data replaces it, else {default}" in out


# --- 6. a decomposition of another model class ----------------------------------------------------


@pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer was removed in TransformerLens 4")
@pytest.mark.parametrize("computed, reported", [("hooked", "bridge"), ("bridge", "hooked")])
def test_a_report_on_another_model_class_names_the_one_it_needs(capsys, tmp_path, corpus, hf_dir,  # noqa: F811
                                                                computed, reported):
    dec = tmp_path / "dec"
    code, _, err = run(capsys, "decompose", hf_dir, "--model-class", computed, "--data", corpus, "--seq-len", "16",
                       "--max-sequences", "8", "--out", dec, *TINY)
    assert code == 0, err
    saved = json.loads((dec / "decomposition.json").read_text())["adapter"]
    for extra in ([], ["--no-check-weights"]):  # the unchecked weights would be the wrong ones
        line = one_line_error(capsys, "report", dec, "--model-class", reported, *extra, "--out", tmp_path / "r.html")
        assert f"computed on a {saved} model" in line and line.endswith(f"pass --model-class {computed}"), line
        assert "--no-check-weights" not in line
    code, _, err = run(capsys, "report", dec, "--model-class", computed, "--max-sequences", "4", "--out",
                       tmp_path / "r.html", "--quiet")
    assert code == 0, err


def test_a_folder_named_like_a_hub_model_says_it_shadows_the_name(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    code = cli.main(["decompose", "gpt2", "--components", "blocks.0.attn", "--out", "o", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "gpt2 is not a Hugging Face model directory" in err
    assert "a folder named gpt2 here is taken for a local model before the model name" in err
