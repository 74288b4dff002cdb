"""The CLI refuses a batch size its sample mode cannot train before any model loads."""

import pytest

from tests.test_cli_review import one_line_error


@pytest.mark.parametrize("reference", ["random", "mean"])
def test_a_one_sequence_batch_is_refused_before_the_model_loads(capsys, tmp_path, no_model_loading, reference):
    line = one_line_error(capsys, "decompose", "induction", "--components", "blocks.0.attn", "--sample", "sequence",
                          "--batch-size", "1", "--set", f"reference={reference}", "--out", tmp_path / "o", "--quiet")
    assert f"--batch-size 1 with reference '{reference}' and --sample sequence" in line
    assert "use --batch-size >= 2, or --sample token" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra", [["--sample", "token"], ["--sample", "auto"], ["--sample", "sequence", "--set",
                                                                                     "reference=zero", "--divergence",
                                                                                     "mse"]])
def test_one_row_batches_that_can_train_pass_the_check(capsys, tmp_path, no_model_loading, extra):
    """Token mode (auto on a language model) and a fixed reference train on one row: the
    check lets them through to the model load (which this fixture refuses)."""
    with pytest.raises(AssertionError, match="a model was loaded"):
        from l3d_lens.cli import main

        main(["decompose", "induction", "--components", "blocks.0.attn", "--batch-size", "1", *extra,
              "--out", str(tmp_path / "o"), "--quiet"])
