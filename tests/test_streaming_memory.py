"""Streaming text data, the memory estimate that fails before training, and autocast."""

from __future__ import annotations

import pytest
import torch

import l3d_lens
from l3d_lens import memory
from l3d_lens.decomposition import build_task
from l3d_lens.streaming import TokenStream

from .helpers import tiny_lm, tokens


def char_ids(text):
    return [ord(c) % 19 + 1 for c in text]


def write_lines(path, n, width=7):
    path.write_text("\n".join(f"line {i:05d} " + "x" * (i % width) for i in range(n)) + "\n")


def test_token_stream_from_text_files(tmp_path):
    write_lines(tmp_path / "a.txt", 50)
    write_lines(tmp_path / "b.txt", 30)
    stream = TokenStream(tmp_path, char_ids, seq_len=6, batch_size=4, prefix=[0])
    batches = list(stream)
    assert all(b.shape == (4, 6) for b in batches[:-1]) and batches[-1].shape[1] == 6
    assert all((b[:, 0] == 0).all() for b in batches)
    flat = torch.cat([b[:, 1:] for b in batches]).reshape(-1).tolist()
    expected = []
    for name in ("a.txt", "b.txt"):
        for line in (tmp_path / name).read_text().splitlines():
            expected += char_ids(line + "\n")  # each line keeps its newline
    assert flat == expected[: len(flat)] and len(expected) - len(flat) < 5
    assert [b.tolist() for b in stream] == [b.tolist() for b in batches]  # re-iterable, same order


def test_token_stream_reads_lazily(tmp_path):
    write_lines(tmp_path / "big.txt", 20000)
    stream = TokenStream(tmp_path / "big.txt", char_ids, seq_len=8, batch_size=2, max_batches=1)
    assert len(list(stream)) == 1
    assert stream.texts_read < 10  # one batch needs a few lines, not the 20000


def test_token_stream_from_hf_dataset_on_disk(tmp_path):
    import datasets

    texts = [f"story number {i}" for i in range(40)]
    datasets.Dataset.from_dict({"text": texts, "id": list(range(40))}).save_to_disk(str(tmp_path / "ds"))
    stream = TokenStream(tmp_path / "ds", char_ids, seq_len=5, batch_size=3)
    flat = torch.cat(list(stream)).reshape(-1).tolist()
    assert flat == [t for text in texts for t in char_ids(text)][: len(flat)]
    with pytest.raises(ValueError, match="has no column 'body'; columns: \\['text', 'id'\\]"):
        next(iter(TokenStream(tmp_path / "ds", char_ids, seq_len=5, batch_size=3, text_column="body")))


def test_token_stream_skips_blank_dataset_rows(tmp_path):
    """WikiText-style rows ('' and ' ') added a separator each, and a None text failed inside the
    tokenizer; blank lines of a text file were already skipped."""
    import datasets

    texts = ["alpha", "", " \n", None, "beta"]
    datasets.Dataset.from_dict({"text": texts, "n": [1, 2, 3, 4, 5]}).save_to_disk(str(tmp_path / "ds"))
    stream = TokenStream(tmp_path / "ds", char_ids, seq_len=4, batch_size=1, separator=[0])
    flat = torch.cat(list(stream)).reshape(-1).tolist()
    assert flat == (char_ids("alpha") + [0] + char_ids("beta") + [0])[:8] and len(flat) == 8  # 11 ids: two rows of 4
    assert stream.texts_read == 2
    with pytest.raises(TypeError, match=r"column 'n' holds int at row 0; it must hold text"):
        next(iter(TokenStream(tmp_path / "ds", char_ids, seq_len=4, batch_size=1, text_column="n")))


def test_token_stream_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        TokenStream(tmp_path / "missing.txt", char_ids, 5, 2)
    with pytest.raises(TypeError, match="tokenize must be a callable"):
        TokenStream(tmp_path, 42, 5, 2)
    with pytest.raises(ValueError, match="seq_len must be an int"):
        TokenStream(tmp_path, char_ids, 1, 2, prefix=[0])


def test_decompose_on_a_stream(tmp_path):
    write_lines(tmp_path / "a.txt", 200)
    stream = TokenStream(tmp_path / "a.txt", char_ids, seq_len=6, batch_size=8, max_batches=4)
    model = tiny_lm("bridge", dtype=torch.float32)
    dec = l3d_lens.decompose(model, stream, l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=3, rank=1,
                                                               epochs=2, sample="sequence"), progress=False)
    assert dec.history[-1]["steps"] == 8


def test_memory_estimate_grows_and_fails_early(monkeypatch):
    model = tiny_lm("bridge", dtype=torch.float32)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.mlp"], n_subnetworks=4, rank=2)
    task = build_task(model, cfg)
    small, big = sum(memory.estimate(task, 4, 6).values()), sum(memory.estimate(task, 64, 6).values())
    assert big > 8 * small
    exact = sum(memory.estimate(build_task(model, cfg.replace(engine="exact")), 4, 6).values())
    assert exact > small
    assert memory.available(torch.device("cpu")) > 0
    monkeypatch.setattr(memory, "available", lambda device: 1024)
    with pytest.raises(MemoryError, match=r"needs about .* GiB at its peak but 0.0 GiB is available on cpu"):
        l3d_lens.decompose(model, tokens(8, 6), cfg, progress=False)


def test_the_fast_token_mode_estimate_charges_each_block_once_not_once_per_target():
    """Token mode's batched backward frees each block's gradients as it goes, so a deeper model
    adds its blocks' activations once, not once per target position: the estimate once charged
    every block per target, 16x the measured peak on TinyStories-8M at 64 tokens (BENCHMARKS.md
    "Memory estimate"), and refused runs that fit. Which block is decomposed does not change it."""
    def model_part(n_layers, components="blocks.1.attn", sample="token"):
        cfg = l3d_lens.L3DConfig(components=components, n_subnetworks=4, rank=2, sample=sample)
        task = build_task(tiny_lm("bridge", dtype=torch.float32, n_layers=n_layers), cfg)
        return memory.estimate(task, 8, 6)["model forward/backward"]

    deeper_token = model_part(4) - model_part(2)
    deeper_sequence = model_part(4, sample="sequence") - model_part(2, sample="sequence")
    assert 0 < deeper_token <= deeper_sequence
    assert model_part(4, "blocks.3.attn") == model_part(4, "blocks.0.attn")


def test_bf16_autocast_runs_with_fp32_factors():
    model = tiny_lm("bridge", dtype=torch.float32)
    x = tokens(8, 6)
    base = l3d_lens.L3DConfig(components="blocks.1.attn", n_subnetworks=3, rank=2, epochs=1, sample="sequence",
                              reference="mean")
    dec = l3d_lens.decompose(model, x, base, progress=False)
    half = l3d_lens.decompose(model, x, base.replace(autocast="bf16"), progress=False)
    assert all(v.dtype == torch.float32 for v in half.factors.values())
    a, b = dec.coefficients(x), half.coefficients(x)
    assert torch.isfinite(b).all() and ((a - b).abs().max() / a.abs().max()) < 0.1
    with pytest.raises(ValueError, match="choose one of None, 'bf16', 'fp16'"):
        base.replace(autocast="int8")
    with pytest.raises(ValueError, match="use engine='fast'"):
        base.replace(autocast="bf16", engine="exact")
