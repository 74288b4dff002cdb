"""TokenStream review fixes: tokenizers that add BOS, newlines of text files, .jsonl files,
max_batches and unknown dataset splits. Nothing is downloaded: the GPT-2 tokenizer is a
byte-level vocabulary without merges written to a temporary folder."""

from __future__ import annotations

import json
import types

import pytest
import torch

from l3d_lens.streaming import TokenStream

from .helpers import EOT, write_tiny_gpt2

torch.set_num_threads(1)


def char_ids(text):
    return [ord(c) for c in text]


def chars(ids):
    return "".join(map(chr, ids))


def flat(stream):
    return torch.cat([b.reshape(-1) for b in stream]).tolist()


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    """The tokenizer as TransformerLens sets it up: add_bos_token=True, so encode(text) starts with BOS."""
    pytest.importorskip("transformers")
    from transformers import GPT2Tokenizer

    out = write_tiny_gpt2(tmp_path_factory.mktemp("tok"))
    tok = GPT2Tokenizer(str(out / "vocab.json"), str(out / "merges.txt"), add_bos_token=True)
    assert tok.encode("hi") == [EOT, 104, 105]  # the premise: plain encode prepends BOS
    return tok


# 1. a tokenizer (or a model's tokenizer) encodes without special tokens

def test_tokenizer_that_adds_bos_gives_exactly_the_requested_separators(tmp_path, bos_tokenizer):
    (tmp_path / "a.txt").write_text("hello world\nsecond line\n")
    for tokenize in (bos_tokenizer, types.SimpleNamespace(tokenizer=bos_tokenizer)):  # a tokenizer, a "model"
        stream = TokenStream(tmp_path / "a.txt", tokenize, seq_len=27, batch_size=1, separator=[EOT], prefix=[EOT])
        ids = flat(stream)
        assert ids == [EOT] + list(b"hello world\n") + [EOT] + list(b"second line\n") + [EOT]
        assert bos_tokenizer.decode(ids) == "<|endoftext|>hello world\n<|endoftext|>second line\n<|endoftext|>"


def test_transformer_lens_model_as_tokenize_adds_no_bos(tmp_path):
    pytest.importorskip("transformers")
    from l3d_lens.cli import load_model

    model = load_model(str(write_tiny_gpt2(tmp_path / "gpt2", model=True)))
    assert model.tokenizer.encode("hi")[0] == EOT  # TransformerLens turned add_bos_token on
    (tmp_path / "a.txt").write_text("hello world\nsecond line\n")
    ids = flat(TokenStream(tmp_path / "a.txt", model, seq_len=27, batch_size=1, separator=[EOT], prefix=[EOT]))
    assert model.tokenizer.decode(ids) == "<|endoftext|>hello world\n<|endoftext|>second line\n<|endoftext|>"


def test_plain_callables_and_other_encoders_are_used_as_given(tmp_path):
    (tmp_path / "a.txt").write_text("ab\ncd\n")
    seen = []

    def tokenize(text):
        seen.append(text)
        return [9] + char_ids(text)  # a callable that adds its own marker keeps it

    assert flat(TokenStream(tmp_path / "a.txt", tokenize, seq_len=8, batch_size=1)) == [9, 97, 98, 10, 9, 99, 100, 10]
    assert seen == ["ab\n", "cd\n"]

    class TiktokenLike:  # .encode without add_special_tokens
        def encode(self, text, *, allowed_special=()):
            return char_ids(text)

    assert flat(TokenStream(tmp_path / "a.txt", TiktokenLike(), seq_len=3, batch_size=2)) == char_ids("ab\ncd\n")


def test_model_without_tokenizer_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("ab\n")
    model = torch.nn.Linear(2, 2)
    model.tokenizer = None
    with pytest.raises(TypeError, match="has no tokenizer"):
        TokenStream(tmp_path / "a.txt", model, seq_len=3, batch_size=1)


# 2. the lines of a text file keep their newline

def test_text_file_lines_keep_their_newline(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\nsecond line\n\n  \nlast line without newline")
    (tmp_path / "b.txt").write_text("next file\r\nwindows line\r\n")
    stream = TokenStream(tmp_path, char_ids, seq_len=10, batch_size=1)
    text = "hello world\nsecond line\nlast line without newline\nnext file\nwindows line\n"
    out = chars(flat(stream))
    assert out == text[:len(out)] and len(text) - len(out) < 10
    assert stream.texts_read == 5  # blank and whitespace-only lines are skipped
    # a separator still goes after each line: each line is one text
    (tmp_path / "c.txt").write_text("ab\ncd\n")
    assert flat(TokenStream(tmp_path / "c.txt", char_ids, seq_len=4, batch_size=2, separator=[0])) == \
        [97, 98, 10, 0, 99, 100, 10, 0]


def test_text_file_decodes_to_its_text_with_a_tokenizer(tmp_path, bos_tokenizer):
    (tmp_path / "a.txt").write_text("hello world\nsecond line\n")
    ids = flat(TokenStream(tmp_path / "a.txt", bos_tokenizer, seq_len=24, batch_size=1))
    assert bos_tokenizer.decode(ids) == "hello world\nsecond line\n"


# 3. .jsonl files are read by their text_column field

def test_jsonl_is_read_by_its_text_field(tmp_path):
    records = [{"text": "alpha", "id": 1}, {"text": "", "id": 2}, {"text": "  ", "id": 3}, {"text": None, "id": 4},
               {"text": "beta", "id": 5}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n"
                                      + "\n".join(json.dumps(r) for r in records[2:]) + "\n")
    stream = TokenStream(tmp_path / "d.jsonl", char_ids, seq_len=11, batch_size=1, separator=[0])
    assert flat(stream) == char_ids("alpha") + [0] + char_ids("beta") + [0]
    assert stream.texts_read == 2  # blank and None texts are skipped, as in a saved dataset
    (tmp_path / "e.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    assert chars(flat(TokenStream(tmp_path / "e.jsonl", char_ids, seq_len=3, batch_size=1, text_column="body"))) \
        == "onetwo"
    # a folder reads its .jsonl files too, in name order with the .txt files
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "b.txt").write_text("xyz\n")
    (tmp_path / "folder" / "a.jsonl").write_text('{"text": "alpha"}\n')
    (tmp_path / "folder" / "c.jsonl").write_text('{"text": "beta"}\n')
    (tmp_path / "folder" / "d.json").write_text('{"text": "not read"}\n')
    assert chars(flat(TokenStream(tmp_path / "folder", char_ids, seq_len=13, batch_size=1))) == "alphaxyz\nbeta"


@pytest.mark.parametrize("line, error, message", [
    ('{"text": 3}', TypeError, r"d\.jsonl:2: field 'text' holds int; it must hold text \(str\)"),
    ('{"text": ["a"]}', TypeError, r"d\.jsonl:2: field 'text' holds list"),
    ('{"body": "a"}', ValueError, r"d\.jsonl:2: not a JSON object with a 'text' field"),
    ('["a"]', ValueError, r"d\.jsonl:2: not a JSON object with a 'text' field"),
    ('{"text": "a"', ValueError, r"d\.jsonl:2: not valid JSON"),
])
def test_jsonl_bad_records_name_the_line(tmp_path, line, error, message):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(error, match=message):
        list(TokenStream(tmp_path / "d.jsonl", char_ids, seq_len=3, batch_size=1))


# 4. max_batches is None or an int >= 1

@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_max_batches_must_be_positive(tmp_path, bad):
    (tmp_path / "a.txt").write_text("hello world\n" * 20)
    with pytest.raises(ValueError, match=r"max_batches must be None or an int >= 1"):
        TokenStream(tmp_path / "a.txt", char_ids, seq_len=4, batch_size=2, max_batches=bad)
    assert len(list(TokenStream(tmp_path / "a.txt", char_ids, seq_len=4, batch_size=2, max_batches=1))) == 1
    assert len(list(TokenStream(tmp_path / "a.txt", char_ids, seq_len=4, batch_size=2, max_batches=None))) > 1


# 5. an unknown split of a saved DatasetDict is refused, listing the splits

@pytest.fixture
def dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "dsdict"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["val one", "val two"]}),
                          "test": datasets.Dataset.from_dict({"text": ["test one"]})}).save_to_disk(str(path))
    return path


def test_unknown_split_is_refused_with_the_splits(dataset_dict):
    with pytest.raises(ValueError, match=r"no split 'nosuch'; it has \['test', 'validation'\]"):
        TokenStream(dataset_dict, char_ids, seq_len=4, batch_size=1, split="nosuch")
    assert chars(flat(TokenStream(dataset_dict, char_ids, seq_len=3, batch_size=1, split="test"))) == "test one"[:6]


def test_unknown_split_is_refused_when_iterating_too(dataset_dict):
    """Without dataset_dict.json to read at construction, the check happens on the loaded dataset."""
    stream = TokenStream(dataset_dict, char_ids, seq_len=4, batch_size=1, split="validation")
    stream.split = "nosuch"
    with pytest.raises(ValueError, match=r"no split 'nosuch'; it has \['test', 'validation'\]"):
        next(iter(stream))


def test_dataset_dict_without_split_is_refused_at_construction(dataset_dict):
    with pytest.raises(ValueError, match=r"holds splits \['test', 'validation'\]; pass split="):
        TokenStream(dataset_dict, char_ids, seq_len=4, batch_size=1)
