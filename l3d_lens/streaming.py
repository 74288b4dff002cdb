"""Streaming token batches from text files or an HF dataset saved on disk, tokenised on the
fly: only the current batch of text is in memory. The stream is re-iterable (each pass
re-reads the source in the same order), so it works as ``decompose`` data and resumes from
a checkpoint by skipping batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

import torch

Tokenize = Union[Callable[[str], Sequence[int]], object]


def _tokenizer(tokenize: Tokenize) -> Callable[[str], list[int]]:
    if hasattr(tokenize, "tokenizer") and getattr(tokenize, "tokenizer") is not None:  # a TL model
        tokenize = tokenize.tokenizer
    if hasattr(tokenize, "encode"):
        enc = tokenize.encode
        return lambda text: list(enc(text))
    if callable(tokenize):
        return lambda text: list(tokenize(text))
    raise TypeError("tokenize must be a callable str -> list[int], a tokenizer with .encode, or a model with "
                    f".tokenizer; got {type(tokenize).__name__}")


def _is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file())


class TokenStream:
    """Batches of token ids [batch_size, seq_len] cut from a text source.

    source: a text file, a folder of ``*.txt`` files, a list of files, or an HF dataset saved
    with ``save_to_disk`` (read with memory mapping, column ``text_column``). Blank lines and
    blank or missing (None) dataset texts are skipped. Texts are tokenised one at a time, joined with ``separator`` ids (e.g. [bos]) and cut into
    sequences of ``seq_len``; ``prefix`` ids start every sequence. ``max_batches`` caps a pass.
    """

    def __init__(self, source: Union[str, Path, Sequence[Union[str, Path]]], tokenize: Tokenize, seq_len: int,
                 batch_size: int, *, text_column: str = "text", split: Optional[str] = None,
                 separator: Sequence[int] = (), prefix: Sequence[int] = (), max_batches: Optional[int] = None):
        if not isinstance(seq_len, int) or seq_len < 1 + len(prefix):
            raise ValueError(f"seq_len must be an int > len(prefix) = {len(prefix)}, got {seq_len!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.sources = [Path(source)] if isinstance(source, (str, Path)) else [Path(s) for s in source]
        missing = [str(s) for s in self.sources if not s.exists()]
        if missing:
            raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
        self.encode = _tokenizer(tokenize)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.text_column, self.split = text_column, split
        self.separator, self.prefix = list(separator), list(prefix)
        self.max_batches = max_batches
        self.texts_read = 0

    def texts(self) -> Iterator[str]:
        for src in self.sources:
            if _is_dataset_dir(src):
                yield from self._dataset_texts(src)
            elif src.is_dir():
                for f in sorted(src.glob("*.txt")):
                    yield from self._file_texts(f)
            else:
                yield from self._file_texts(src)

    def _file_texts(self, path: Path) -> Iterator[str]:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.rstrip("\n")
                if line.strip():
                    self.texts_read += 1
                    yield line

    def _dataset_texts(self, path: Path) -> Iterator[str]:
        try:
            import datasets
        except ImportError:
            raise ImportError("reading an HF dataset from disk needs the 'datasets' package: pip install datasets") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if self.split is None:
                raise ValueError(f"{path} holds splits {list(ds)}; pass split=")
            ds = ds[self.split]
        if self.text_column not in ds.column_names:
            raise ValueError(f"{path} has no column {self.text_column!r}; columns: {ds.column_names}")
        for i, row in enumerate(ds):
            text = row[self.text_column]
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
        rows: list[list[int]] = []
        produced = 0
        for text in self.texts():
            buffer.extend(self.encode(text))
            buffer.extend(self.separator)
            while len(buffer) >= body:
                rows.append(self.prefix + buffer[:body])
                del buffer[:body]
                if len(rows) == self.batch_size:
                    yield torch.tensor(rows, dtype=torch.long)
                    rows = []
                    produced += 1
                    if self.max_batches is not None and produced >= self.max_batches:
                        return
        if rows:
            yield torch.tensor(rows, dtype=torch.long)
