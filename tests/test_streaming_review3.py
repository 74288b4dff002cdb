"""TokenStream review 3: .json files read as the CLI reads them, files that are not UTF-8 named
by file and line, long documents and saved datasets read without quadratic or row-by-row work,
clear refusals of bool sizes, unused splits, texts or datasets in memory, tokenizers that do not
return token ids and sources shorter than a sequence; and token ids of unsigned integer dtypes
(a nanoGPT uint16 memmap) taken as data. The tokenizer is the byte-level GPT-2 of
``helpers.write_tiny_gpt2``: every id is a byte, so a text's ids are ``text.encode('utf-8')``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import l3d_lens
from l3d_lens.adapters import make_adapter
from l3d_lens.data import batches, check_data
from l3d_lens.streaming import TokenStream

from .helpers import EOT, tiny_lm, tokens, write_tiny_gpt2

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:the last epoch's reconstruction loss")


def flat(stream):
    return torch.cat([b.reshape(-1) for b in stream]).tolist()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    pytest.importorskip("transformers")
    from transformers import GPT2Tokenizer

    out = write_tiny_gpt2(tmp_path_factory.mktemp("tok"))
    return GPT2Tokenizer(str(out / "vocab.json"), str(out / "merges.txt"))


# 1. a .json file is a JSON array of texts, as the CLI reads it

def test_json_file_streams_its_texts_as_the_cli_reads_them(tmp_path, tokenizer):
    """Its JSON syntax streamed as lines of text before: '[\\n', ' {\\n', '  "text": "first doc"\\n', ..."""
    items = [{"text": "first doc"}, {"text": ""}, {"text": None}, "second doc", " ", {"text": "caf\u00e9 \u4e2d"}]
    (tmp_path / "a.json").write_text(json.dumps(items, indent=1))
    stream = TokenStream(tmp_path / "a.json", tokenizer, seq_len=4, batch_size=2, separator=[EOT])
    texts = list(stream.texts())
    assert texts == ["first doc", "second doc", "caf\u00e9 \u4e2d"]  # blank or null items skipped, as by the CLI
    expected = [i for t in texts for i in [*t.encode("utf-8"), EOT]]
    ids = flat(stream)
    assert ids == expected[:len(ids)] and len(expected) - len(ids) < 4
    (tmp_path / "b.json").write_text(json.dumps([{"body": "x"}]))
    with pytest.raises(ValueError, match=r"b\.json: item 0: no 'text' field"):
        list(TokenStream(tmp_path / "b.json", tokenizer, 4, 1).texts())
    (tmp_path / "c.json").write_text(json.dumps({"text": "not in an array"}))
    with pytest.raises(ValueError, match=r"c\.json: a \.json source holds a JSON array of texts"):
        list(TokenStream(tmp_path / "c.json", tokenizer, 4, 1).texts())
    (tmp_path / "d.json").write_text("plain text, not JSON\n")
    with pytest.raises(ValueError, match=r"d\.json:1: not valid JSON"):
        list(TokenStream(tmp_path / "d.json", tokenizer, 4, 1).texts())


# 2. a file that is not UTF-8 is named, with its line and the fix

@pytest.mark.parametrize("name, data", [("b.txt", b"fine\ncaf\xe9 latin-1\n"),
                                        ("b.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n'),
                                        ("b.json", b'["fine",\n "caf\xe9"]\n')])
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, tokenizer, name, data):
    (tmp_path / "a.txt").write_text("good line\n" * 50)
    (tmp_path / name).write_bytes(data)
    source = tmp_path if name != "b.json" else [tmp_path / "a.txt", tmp_path / name]  # a folder holds no .json
    with pytest.raises(ValueError, match=rf"{name}:2: not UTF-8 text \(byte 0xe9 .*re-encode the file as UTF-8"):
        list(TokenStream(source, tokenizer, seq_len=8, batch_size=2))


# 3. long documents and saved datasets: the same tokens, without quadratic or row-by-row work

def test_long_documents_pack_exactly_as_before(tmp_path, tokenizer):
    """Rows are cut at a read offset (compacted once a text), not by deleting each row from the
    front of the buffer, which was quadratic in a document's length; the ids are those of the
    texts joined by the separator, cut into sequences after the prefix."""
    docs = ["x" * 5000 + "y", "short", "\u00e9" * 3001, "z" * 257]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for separator in ([], [EOT], [EOT, 1]):
        for prefix in ([], [EOT]):
            for seq_len, batch_size in ((2, 1), (7, 3), (64, 8), (255, 2)):
                stream = TokenStream(tmp_path / "a.jsonl", tokenizer, seq_len, batch_size, separator=separator,
                                     prefix=prefix)
                body = seq_len - len(prefix)
                joined = [i for d in docs for i in [*d.encode("utf-8"), *separator]]
                whole = len(joined) // body
                expected = [prefix + joined[r * body:(r + 1) * body] for r in range(whole)]
                got = [row for b in stream for row in b.tolist()]
                assert got == expected, (separator, prefix, seq_len, batch_size)
                assert [len(b) for b in stream] == [len(b) for b in torch.split(torch.tensor(got), batch_size)]


def test_saved_dataset_is_read_in_batches_of_its_text_column(tmp_path, tokenizer, monkeypatch):
    """Row by row, with every column, was many times slower (7.2 s vs 0.2 s on 300k rows)."""
    datasets = pytest.importorskip("datasets")
    texts = [f"story {i}" if i % 7 else ("" if i % 2 else None) for i in range(2500)]
    datasets.Dataset.from_dict({"text": texts, "other": [[i] * 50 for i in range(2500)]}).save_to_disk(
        str(tmp_path / "ds"))

    def refuse(*args, **kwargs):
        raise AssertionError("rows read one at a time")

    monkeypatch.setattr(datasets.Dataset, "__iter__", refuse)
    monkeypatch.setattr(datasets.Dataset, "__getitem__", refuse)
    stream = TokenStream(tmp_path / "ds", tokenizer, seq_len=16, batch_size=4)
    assert list(stream.texts()) == [t for t in texts if t]
    ids = flat(stream)
    expected = [i for t in texts if t for i in t.encode("utf-8")]
    assert ids == expected[:len(ids)] and len(expected) - len(ids) < 16


# 4. input checks

@pytest.mark.parametrize("arg", ["seq_len", "batch_size"])
def test_bool_sizes_are_refused(tmp_path, tokenizer, arg):
    (tmp_path / "a.txt").write_text("hello\n")
    sizes = {"seq_len": 4, "batch_size": 1, arg: True}
    with pytest.raises(ValueError, match=rf"{arg} must be an int"):
        TokenStream(tmp_path / "a.txt", tokenizer, **sizes)


def test_a_split_that_nothing_has_is_refused(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a b c"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=r"split='validation' .* is a saved Dataset, which has no splits"):
        TokenStream(tmp_path / "ds", tokenizer, 4, 1, split="validation")
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(ValueError, match=r"split='train' .* the source holds no saved dataset"):
        TokenStream(tmp_path / "a.txt", tokenizer, 4, 1, split="train")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["d e f"]})}).save_to_disk(str(tmp_path / "dd"))
    stream = TokenStream([tmp_path / "dd", tmp_path / "ds"], tokenizer, 2, 1, split="train")  # the split is used
    assert list(stream.texts()) == ["d e f", "a b c"]


def test_texts_or_datasets_in_memory_are_refused_with_what_to_do(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    with pytest.raises(TypeError, match=r"'hello world' is not a file or folder, and looks like text: .*\.jsonl"):
        TokenStream(["hello world", "second"], tokenizer, 4, 1)
    with pytest.raises(TypeError, match=r"source is a Dataset in memory.*save_to_disk\(folder\)"):
        TokenStream(datasets.Dataset.from_dict({"text": ["a"]}), tokenizer, 4, 1)
    with pytest.raises(TypeError, match=r"source must be a path \(str or Path\).*; got dict"):
        TokenStream({"text": ["a"]}, tokenizer, 4, 1)
    with pytest.raises(FileNotFoundError, match="no such file or folder: missing.txt"):  # a path stays a path
        TokenStream(["missing.txt"], tokenizer, 4, 1)


def test_a_tokenizer_that_returns_no_token_ids_is_named(tmp_path, tokenizer):
    from l3d_lens.cli import load_model

    (tmp_path / "a.txt").write_text("hello world\n")
    model = load_model(str(write_tiny_gpt2(tmp_path / "gpt2", model=True)))
    with pytest.raises(TypeError, match=r"returned a torch.int64 Tensor of shape \[1, 13\] for 'hello world\\n'; "
                                        r"return model.to_tokens\(text, prepend_bos=False\)\[0\]"):
        list(TokenStream(tmp_path / "a.txt", model.to_tokens, 4, 1))
    with pytest.raises(TypeError, match=r"returned a BatchEncoding with keys \['input_ids', 'attention_mask'\] .*"
                                        r"return tokenizer\(text\)\['input_ids'\]"):
        list(TokenStream(tmp_path / "a.txt", lambda s: tokenizer(s), 4, 1))
    assert flat(TokenStream(tmp_path / "a.txt", lambda s: tokenizer(s)["input_ids"], 4, 1)) == list(b"hello world\n")


def test_a_source_shorter_than_one_sequence_says_how_many_tokens_it_has(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("hello\n\nworld\n")
    stream = TokenStream(tmp_path / "a.txt", tokenizer, seq_len=20, batch_size=1, separator=[EOT], prefix=[EOT])
    with pytest.raises(ValueError, match=r"the stream has 14 tokens \(2 texts\), fewer than one sequence of "
                                         r"seq_len=20 needs \(19 after the 1 prefix id\(s\)\)"):
        list(stream)


# 5. token ids of any integer dtype

@pytest.mark.parametrize("engine", ["fast", "exact"])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int16, np.uint8])
def test_unsigned_token_ids_are_data(dtype, engine):
    model = tiny_lm("bridge", dtype=torch.float32)
    adapter = make_adapter(model)
    ids = tokens(8, 6)
    data = torch.from_numpy(ids.numpy().astype(dtype))  # a nanoGPT-style memmap
    before = data.clone()
    check_data(adapter, data, None, False)
    got = [x for x, _ in batches(adapter, data, None, 4)]
    assert all(x.dtype == torch.int64 for x in got) and torch.equal(torch.cat(got), ids)
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=2, rank=1, epochs=1, batch_size=4,
                             engine=engine)
    dec, ref = l3d_lens.decompose(model, data, cfg, progress=False), l3d_lens.decompose(model, ids, cfg, progress=False)
    assert torch.equal(dec.coefficients(data), ref.coefficients(ids))
    assert data.dtype == before.dtype and torch.equal(data, before)  # the user's tensor is untouched
    data[0, 0] = 20  # d_vocab is 20
    with pytest.raises(ValueError, match=r"data holds token ids outside \[0, 20\)"):
        check_data(adapter, data, None, False)
