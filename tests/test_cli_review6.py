"""Review fixes of the ``l3d-lens`` command (6): ``decompose`` checks what needs the model but no
data (the --components selectors, the rank, the engine's sites: ``build_task``) once the model
loads, before the data are tokenized, so that a typo stops the command before --max-sequences
of text are read, with the message ``decompose`` gives; its warnings are still said once."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import l3d_lens.cli as cli
import l3d_lens.decomposition as decomposition
from l3d_lens import L3DConfig

from .test_cli import hf_dir  # noqa: F401 - the tiny local GPT-2 fixture
from .test_cli_review import one_line_error

torch.set_num_threads(1)

RUN = ["--n-subnetworks", "2", "--rank", "1", "--epochs", "1", "--quiet"]


@pytest.fixture
def tokenized(monkeypatch) -> list:
    """The calls of ``cli.tokens_from`` (which reads and tokenizes the data), each still made."""
    calls = []
    real = cli.tokens_from

    def recording(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "tokens_from", recording)
    return calls


def selector_error(model, **cfg) -> str:
    """The first line of the error ``build_task`` (as ``decompose`` runs it) raises for ``cfg``."""
    with pytest.raises(ValueError) as e:
        decomposition.build_task(model, L3DConfig(**cfg))
    return str(e.value).splitlines()[0]


@pytest.mark.parametrize("components", ["blocks.9.attn", "blocks.0.atn"])
def test_a_bad_selector_stops_decompose_before_the_data_are_tokenized(capsys, tmp_path, tokenized, components):
    line = one_line_error(capsys, "decompose", "induction", "--components", components, *RUN, "--out", tmp_path / "o")
    expected = selector_error(cli.load_model("induction"), components=[components])
    assert line == f"l3d-lens decompose: error: {expected}"
    assert ("layer 9 out of range" if "9" in components else "matches no weight") in line
    assert tokenized == []  # the embedded task's sequences were not drawn either
    assert not (tmp_path / "o").exists()


def test_a_bad_selector_is_named_before_a_bad_line_further_in_the_data(capsys, tmp_path, hf_dir):  # noqa: F811
    data = tmp_path / "corpus.jsonl"  # read_data checks the first line; tokenizing reads the second
    data.write_text(json.dumps({"text": "the cat sat on the mat. " * 4}) + "\nnot json\n")
    line = one_line_error(capsys, "decompose", hf_dir, "--model-class", "bridge", "--data", data, "--components",
                          "blocks.2.mlp", *RUN, "--out", tmp_path / "o")
    assert "selector 'blocks.2.mlp': layer 2 out of range; the model has 2 layers (0..1)" in line
    line = one_line_error(capsys, "decompose", hf_dir, "--model-class", "bridge", "--data", data, "--components",
                          "blocks.1.mlp", *RUN, "--out", tmp_path / "o")
    assert f"{data}:2: not a JSON object with a 'text' field" in line  # a good selector: the data are read


def test_a_rank_above_the_selected_weights_stops_decompose_before_the_data(capsys, tmp_path, tokenized):
    line = one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn.W_Q", "--n-subnetworks",
                          "2", "--rank", "1000", "--epochs", "1", "--quiet", "--out", tmp_path / "o")
    assert "rank 1000 is above every dimension of the selected weights" in line
    assert tokenized == []


def test_a_good_selector_runs_and_its_warnings_come_once(capsys, tmp_path, tokenized, monkeypatch):
    real = decomposition.build_task

    def warning(*args, **kwargs):
        warnings.warn("a warning of build_task", UserWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(decomposition, "build_task", warning)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        code = cli.main(["decompose", "induction", "--components", "blocks.0.attn", *RUN, "--max-sequences", "8",
                         "--batch-size", "8", "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    assert len(tokenized) == 1 and (tmp_path / "o" / "decomposition.json").is_file()
    assert [str(w.message) for w in said if "build_task" in str(w.message)] == ["a warning of build_task"]
