"""Streaming token batches from text, .jsonl or .json files or an HF dataset saved on disk,
tokenised on the fly: only the current batch of text is in memory (of a .json file, its
texts). The stream is re-iterable (each pass re-reads the source in the same order), so it
works as ``decompose`` data and resumes from a checkpoint by skipping batches.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import torch

from .checks import as_index

Tokenize = Union[Callable[[str], Sequence[int]], object]


def _takes_keyword(fn: Callable, name: str) -> bool:
    """Whether ``fn`` names the keyword argument ``name`` (a ``**kwargs`` catch-all does not count)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: try it
        try:
            fn("a", **{name: False})
        except Exception:  # noqa: BLE001 - it does not take the keyword (or cannot be probed)
            return False
        return True
    p = params.get(name)
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_ids(out: object, text: str) -> None:
    """TypeError unless ``out``, what the tokenizer returned for ``text``, is that text's token
    ids: ints >= 0 in a list (or a 1-d integer tensor or array). A tensor [1, n] of
    ``model.to_tokens`` or the BatchEncoding of ``tokenizer(text)`` is not, and would fail later
    with a message that names neither."""
    shape = getattr(out, "shape", None)
    hint = "pass the tokenizer or model itself, or a callable that returns the ids"
    if isinstance(out, Mapping):  # a BatchEncoding too
        what = f"a {type(out).__name__} with keys {list(out.keys())}"
        hint = f"return tokenizer(text)['input_ids'], or {hint}"
    elif shape is not None and len(shape) != 1:
        what = f"a {getattr(out, 'dtype', '')} {type(out).__name__} of shape {list(shape)}"
        if len(shape) == 2:
            hint = f"return model.to_tokens(text, prepend_bos=False)[0] (one row), or {hint}"
    elif isinstance(out, str) or not isinstance(out, Iterable):
        what = f"{type(out).__name__} {_short(out)}"
    else:
        if all(i is not None and i >= 0 for i in map(as_index, out)):
            return
        what = f"{type(out).__name__} {_short(out)}"
    raise TypeError(f"tokenize must return the token ids of a text (a list of ints >= 0, or a 1-d integer tensor), "
                    f"but it returned {what} for {_short(text)}; {hint}")


def _encoder(call: Callable[[str], object]) -> Callable[[str], list[int]]:
    """``call`` (text -> its tokenizer's output) as text -> list of ids; its first output is
    checked with ``_check_ids`` (once: the rest are converted as they come)."""
    checked = False

    def encode(text: str) -> list[int]:
        nonlocal checked
        out = call(text)
        out = getattr(out, "ids", out)  # a `tokenizers` Encoding holds its ids in .ids
        if not checked:
            _check_ids(out, text)
            checked = True
        return [int(i) for i in out]

    return encode


def _tokenizer(tokenize: Tokenize) -> Callable[[str], list[int]]:
    if hasattr(tokenize, "tokenizer"):  # a TL model: use its tokenizer
        if tokenize.tokenizer is None:
            raise TypeError(f"tokenize: this {type(tokenize).__name__} has no tokenizer (its .tokenizer is None); "
                            "pass a tokenizer or a callable str -> list[int]")
        tokenize = tokenize.tokenizer
    if hasattr(tokenize, "encode"):
        enc = tokenize.encode
        # A Hugging Face tokenizer adds its special tokens by default (TransformerLens turns on
        # add_bos_token, so encode(text) starts with BOS): leave them out, so that the ids between
        # texts and at the start of sequences are exactly `separator` and `prefix`.
        if _takes_keyword(enc, "add_special_tokens"):
            return _encoder(lambda text: enc(text, add_special_tokens=False))
        return _encoder(enc)
    if callable(tokenize):
        return _encoder(tokenize)
    raise TypeError("tokenize must be a callable str -> list[int], a tokenizer with .encode, or a model with "
                    f".tokenizer; got {type(tokenize).__name__}")


def _is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def _saved_splits(path: Path) -> Optional[list[str]]:
    """The splits of a DatasetDict saved at ``path``, read from its dataset_dict.json (cheap: no
    import of ``datasets``); None for a single Dataset or when the file cannot be read."""
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sorted(str(s) for s in splits) if isinstance(splits, list) else None


def _folder_files(folder: Path) -> list[Path]:
    """The files a folder source streams, in reading order."""
    return sorted([*folder.glob("*.txt"), *folder.glob("*.jsonl")])


def _dataset_files(path: Path, split: Optional[str]) -> tuple[list[Path], list[Path]]:
    """(metadata, data) files of a dataset saved with ``save_to_disk`` that a stream of it reads:
    its state.json and dataset_info.json, and its data files as that state.json lists them (of
    ``split`` in a DatasetDict); not the ``cache-*.arrow`` files that ``.map``/``.filter`` on the
    loaded dataset add, nor other splits. Without a readable state.json: no metadata, and every
    file but those caches as data."""
    folder = path / split if split is not None and (path / "dataset_dict.json").is_file() else path
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        data = [folder / d["filename"] for d in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return [], sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith(("cache-", ".")))
    meta = [f for f in (folder / "state.json", folder / "dataset_info.json") if f.is_file()]
    return meta, [f for f in data if f.is_file()]


def _token_ids(arg: str, ids: Sequence[int]) -> list[int]:
    """``ids`` (ints, numpy integers or a 1-d integer tensor, e.g. ``model.to_tokens("")[0]``) as
    a list of Python ints; TypeError naming ``arg`` otherwise."""
    try:
        out = [as_index(i) for i in ids]
    except TypeError:  # not iterable: one id, say, without its list
        out = [None]
    if isinstance(ids, (str, bytes)) or any(i is None or i < 0 for i in out):
        raise TypeError(f"{arg} must be a sequence of token ids (ints >= 0), got {ids!r}")
    return out


def _check_split(path: Path, splits: list[str], split: Optional[str]) -> None:
    if split is None:
        raise ValueError(f"{path} holds splits {splits}; pass split=")
    if split not in splits:
        raise ValueError(f"{path}: no split {split!r}; it has {splits}")


def _check_split_used(sources: list[Path], split: Optional[str]) -> None:
    """ValueError when ``split`` is given but no source is a saved DatasetDict: it would be ignored."""
    if split is None or any((s / "dataset_dict.json").is_file() for s in sources if _is_dataset_dir(s)):
        return
    datasets = [s for s in sources if _is_dataset_dir(s)]
    what = (f"{datasets[0]} is a saved Dataset, which has no splits" if datasets
            else "the source holds no saved dataset")
    raise ValueError(f"split={split!r} picks a split of a saved DatasetDict, but {what}; leave split=None")


ACCEPTED = ("a path (str or Path) to a text, .jsonl or .json file, a folder of .txt and .jsonl files or a dataset "
            "saved with save_to_disk, or a list of such paths")


def _looks_like_text(s: str) -> bool:
    """Whether a source string that names no file reads as text, not a path: it has a line
    break, or words (whitespace) with neither a folder separator nor a file suffix."""
    return "\n" in s or (any(c.isspace() for c in s) and "/" not in s and os.sep not in s
                         and not re.search(r"\.[A-Za-z0-9]{1,8}$", s))


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long, or with a NUL byte
        return False


def _source_paths(source: object) -> list[Path]:
    """The paths ``source`` names; a TypeError naming what a source may be for anything else: a
    dataset in memory, texts instead of paths, other objects."""
    if isinstance(source, (str, os.PathLike)):
        entries = [source]
    elif type(source).__module__.split(".")[0] == "datasets":
        raise TypeError(f"source is a {type(source).__name__} in memory, but TokenStream streams from disk: save it "
                        f"with .save_to_disk(folder) and pass the folder (source: {ACCEPTED})")
    elif isinstance(source, (bytes, Mapping)) or not isinstance(source, Iterable):
        raise TypeError(f"source must be {ACCEPTED}; got {type(source).__name__}")
    else:
        entries = list(source)
    for s in entries:
        if not isinstance(s, (str, os.PathLike)):
            raise TypeError(f"source must be {ACCEPTED}; it holds {type(s).__name__} {_short(s)}")
        if isinstance(s, str) and _looks_like_text(s) and not _exists(s):
            raise TypeError(f"source {_short(s)} is not a file or folder, and looks like text: TokenStream reads texts "
                            f"from files; write them to a .txt file (a text a line) or a .jsonl file, or save a "
                            f"datasets.Dataset with save_to_disk, and pass its path (source: {ACCEPTED})")
    return [Path(s) for s in entries]


def _not_utf8(path: Path, error: UnicodeDecodeError) -> ValueError:
    """The ValueError for a file that is not UTF-8, naming its first undecodable line (found in
    its bytes: no UTF-8 character holds a newline byte) and how to fix it."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where, byte = f"{path}:{n}", f"byte {raw[e.start]:#04x} at column {e.start + 1}"
                break
        else:
            where, byte = str(path), error.reason
    return ValueError(f"{where}: not UTF-8 text ({byte}); TokenStream reads UTF-8: re-encode the file as UTF-8 "
                      f"(e.g. iconv -f latin1 -t utf-8 old > new, naming its encoding)")


def _lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file (universal newlines), each ending in its newline; a
    ValueError naming the file and line where it is not UTF-8."""
    with open(path, encoding="utf-8") as fh:
        try:
            yield from fh
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None


class TokenStream:
    """Batches of token ids [batch_size, seq_len] cut from a text source.

    source: a text file, a ``.jsonl`` file (one JSON object a line, text in its ``text_column``
    field), a ``.json`` file (a JSON array of texts or of objects with a ``text_column`` field, as
    ``l3d-lens decompose --data`` reads it; read whole, as JSON has no lines to stream), a folder
    of ``*.txt`` and ``*.jsonl`` files (read in name order), a list of these, or an HF dataset
    saved with ``save_to_disk`` (read with memory mapping, column ``text_column``; a DatasetDict
    needs ``split=``, which a source without one refuses). Files are UTF-8. Texts in memory (a
    list of str, a ``datasets.Dataset``) are refused: write or save them to disk first.

    Texts: each line of a text file is one text and keeps its newline, and blank lines are
    skipped, so with the default ``separator=()`` a file streams as its text less its blank lines
    (paragraph breaks; ``l3d-lens decompose --data``, which reads a file whole, keeps them); each
    ``.jsonl`` record and each dataset row is one text, and blank or missing (None) ones are
    skipped. Sequences are packed, never padded.

    Texts are tokenised one at a time and joined with ``separator`` ids (nothing by default: pass
    e.g. ``[tokenizer.eos_token_id]`` to mark where one document ends and the next begins), then
    cut into sequences of ``seq_len``; ``prefix`` ids (e.g. ``[tokenizer.bos_token_id]``) start
    every sequence. ``max_batches`` (None or >= 1) caps a pass. A source with fewer tokens than
    one sequence is a ValueError when iterated.

    tokenize: a callable str -> list[int] (used as it is), a tokenizer with ``.encode``, or a
    model with ``.tokenizer`` (a TransformerLens model). A Hugging Face tokenizer is called with
    ``add_special_tokens=False``: the BOS a TransformerLens tokenizer adds to every text would
    otherwise double ``separator``/``prefix``; the ids you pass there are the only ones added.
    """

    def __init__(self, source: Union[str, Path, Sequence[Union[str, Path]]], tokenize: Tokenize, seq_len: int,
                 batch_size: int, *, text_column: str = "text", split: Optional[str] = None,
                 separator: Sequence[int] = (), prefix: Sequence[int] = (), max_batches: Optional[int] = None):
        separator, prefix = _token_ids("separator", separator), _token_ids("prefix", prefix)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1 + len(prefix):
            raise ValueError(f"seq_len must be an int > len(prefix) = {len(prefix)}, got {seq_len!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches < 1):
            raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")
        self.sources = _source_paths(source)
        missing = [str(s) for s in self.sources if not s.exists()]
        if missing:
            raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
        for src in self.sources:
            splits = _saved_splits(src) if _is_dataset_dir(src) else None
            if splits is not None:
                _check_split(src, splits, split)
        _check_split_used(self.sources, split)
        self.encode = _tokenizer(tokenize)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.text_column, self.split = text_column, split
        self.separator, self.prefix = separator, prefix
        self.max_batches = max_batches
        self.texts_read = 0

    def texts(self) -> Iterator[str]:
        for src in self.sources:
            if _is_dataset_dir(src):
                yield from self._dataset_texts(src)
            elif src.is_dir():
                for f in _folder_files(src):
                    yield from self._path_texts(f)
            else:
                yield from self._path_texts(src)

    def fingerprint(self) -> str:
        """What a checkpoint knows this stream by (``training.data_fingerprint``): its settings,
        the files it reads (name and size, in reading order; of a saved dataset, its split's data
        files and its state and info JSON, which hold the dataset's own fingerprint) and the
        SHA-256 of its first batch, which also changes with the tokenizer. Cheap: it reads the
        first batch only. Moving the files elsewhere keeps it; editing a text file to the same
        size past the first batch does not change it."""
        h = hashlib.sha256()
        settings = [self.seq_len, self.batch_size, self.text_column, self.split, self.separator, self.prefix,
                    self.max_batches]
        h.update(json.dumps(settings).encode())
        for src in self.sources:
            meta, files = (_dataset_files(src, self.split) if _is_dataset_dir(src)
                           else ([], _folder_files(src) if src.is_dir() else [src]))
            for f in meta:  # a saved dataset's state and info: small, and hold its own fingerprint of the data
                h.update(f.read_bytes())
            for f in files:
                h.update(f"{f.relative_to(src) if f != src else f.name}:{f.stat().st_size}\n".encode())
        first = next(iter(self), None)
        if first is not None:
            h.update(f"{list(first.shape)}".encode())
            h.update(first.numpy().tobytes())
        return h.hexdigest()

    def _path_texts(self, path: Path) -> Iterator[str]:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return self._jsonl_texts(path)
        return self._json_texts(path) if suffix == ".json" else self._file_texts(path)

    def _file_texts(self, path: Path) -> Iterator[str]:
        for line in _lines(path):
            line = line.rstrip("\n")
            if line.strip():
                self.texts_read += 1
                yield line + "\n"  # the line's newline is text too (added to a last line without one)

    def _jsonl_texts(self, path: Path) -> Iterator[str]:
        col = self.text_column
        for n, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or col not in record:
                raise ValueError(f"{path}:{n}: not a JSON object with a {col!r} field")
            text = record[col]
            if text is None or (isinstance(text, str) and not text.strip()):
                continue  # as blank or missing dataset texts
            if not isinstance(text, str):
                raise TypeError(f"{path}:{n}: field {col!r} holds {type(text).__name__}; it must hold text (str)")
            self.texts_read += 1
            yield text

    def _json_texts(self, path: Path) -> Iterator[str]:
        """The texts of a .json file as the CLI reads them (``cli._texts_from_json``): a JSON array
        of strings or of objects with a ``text_column`` field, blank or null ones skipped."""
        col = self.text_column
        forms = f"a JSON array of texts or of objects with a {col!r} field (or use .jsonl, one object a line)"
        try:
            with open(path, encoding="utf-8") as fh:
                items = json.load(fh)
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json source holds {forms}") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: a .json source holds {forms}, not a JSON {type(items).__name__}")
        for i, item in enumerate(items):
            if isinstance(item, dict):
                if col not in item:
                    raise ValueError(f"{path}: item {i}: no {col!r} field (choose one with text_column=)")
                item = item[col]
            if item is None or (isinstance(item, str) and not item.strip()):
                continue  # as blank or missing dataset texts
            if not isinstance(item, str):
                raise TypeError(f"{path}: item {i}: {_short(item)} is not text (str), nor an object with a {col!r} "
                                f"field holding text")
            self.texts_read += 1
            yield item

    def _dataset_texts(self, path: Path) -> Iterator[str]:
        try:
            import datasets
        except ImportError:
            raise ImportError("reading an HF dataset from disk needs the 'datasets' package: pip install datasets") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            _check_split(path, sorted(ds), self.split)
            ds = ds[self.split]
        if self.text_column not in ds.column_names:
            raise ValueError(f"{path} has no column {self.text_column!r}; columns: {ds.column_names}")
        col = self.text_column
        # batches of the one column: row by row, with every column, is many times slower
        column = (text for rows in ds.select_columns([col]).iter(batch_size=1000) for text in rows[col])
        for i, text in enumerate(column):
            if text is None or (isinstance(text, str) and not text.strip()):
                continue  # blank rows (WikiText has many) would only add separators, as blank lines would
            if not isinstance(text, str):
                raise TypeError(f"{path}: column {self.text_column!r} holds {type(text).__name__} at row {i}; "
                                f"it must hold text (str)")
            self.texts_read += 1
            yield text

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.texts_read = 0
        body = self.seq_len - len(self.prefix)
        buffer: list[int] = []
        start = 0  # buffer[:start] is cut into rows already
        rows: list[list[int]] = []
        produced = n_tokens = 0
        for text in self.texts():
            ids = self.encode(text)
            n_tokens += len(ids) + len(self.separator)
            buffer.extend(ids)
            buffer.extend(self.separator)
            while len(buffer) - start >= body:
                rows.append(self.prefix + buffer[start:start + body])
                start += body
                if len(rows) == self.batch_size:
                    yield torch.tensor(rows, dtype=torch.long)
                    rows = []
                    produced += 1
                    if self.max_batches is not None and produced >= self.max_batches:
                        return
            # once a text, not once a row: a long document's rest would move for every row it gives
            del buffer[:start]
            start = 0
        if rows:
            yield torch.tensor(rows, dtype=torch.long)
        elif not produced:
            raise self._too_short(n_tokens, body)

    def _too_short(self, n_tokens: int, body: int) -> ValueError:
        after = f" ({body} after the {len(self.prefix)} prefix id(s))" if self.prefix else ""
        sources = ", ".join(str(s) for s in self.sources)
        return ValueError(f"{sources}: the stream has {n_tokens} tokens ({self.texts_read} texts), fewer than one "
                          f"sequence of seq_len={self.seq_len} needs{after}; pass a smaller seq_len or more text")
