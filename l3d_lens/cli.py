"""The ``l3d-lens`` command: ``demo``, ``decompose``, ``report`` and ``compare``.

User errors (bad flags, missing files, a model that cannot be loaded, invalid settings)
print one line ``l3d-lens <command>: error: ...`` and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import hashlib
import itertools
import json
import os
import reprlib
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from .checks import is_int
from .config import SEED_RANGE

EMBEDDED = ("induction", "default")
RECORD = "cli_inputs.json"  # written next to a saved decomposition: how to rebuild model and data
MANIFEST = "l3d_lens_outputs.json"  # in each output folder: {file name: SHA-256} of the files l3d-lens wrote
COMPARE_EMBEDDED_ONLY = ("compare needs (clean, corrupted) pairs and a metric; from the command line this is "
                         "available for the embedded model only -- use l3d_lens.patching.compare_with_patching "
                         "from Python for other models")


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


# --- models ------------------------------------------------------------------------------------


def _has_hooked() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


#: how ``load_model`` finds a model: the embedded one, a local folder, or a TransformerLens / hub name
MODEL_SOURCES = ("embedded", "local", "named")


def model_source(spec: str) -> str:
    """How ``load_model`` finds ``spec`` now: the embedded model's name wins over a folder of
    that name, then an existing path is a local folder, else it is a model name. Decided before
    anything is written, as a folder written later may take a model name's place."""
    if spec in EMBEDDED:
        return "embedded"
    return "local" if Path(spec).exists() else "named"


def load_model(spec: str, model_class: str = "auto", device: Optional[str] = None,
               source: Optional[str] = None) -> torch.nn.Module:
    """``induction`` (the embedded default model), a local Hugging Face directory, or a
    TransformerLens model name. model_class: auto | hooked | bridge. ``source`` (one of
    MODEL_SOURCES, as a record keeps it): how to read ``spec``; None: ``model_source(spec)``."""
    source = source or model_source(spec)
    if source not in MODEL_SOURCES:
        raise UserError(f"model source {source!r}: choose one of {', '.join(MODEL_SOURCES)}")
    if model_class not in ("auto", "hooked", "bridge"):
        raise UserError(f"--model-class {model_class!r}: choose auto, hooked or bridge")
    if model_class == "hooked" and not _has_hooked():
        raise UserError("--model-class hooked: this TransformerLens has no HookedTransformer (removed in 4.0); "
                        "use --model-class bridge")
    if device:
        _check_device(device)
    if source == "embedded":
        if spec not in EMBEDDED:
            raise UserError(f"model {spec!r} is not an embedded model ({', '.join(EMBEDDED)})")
        from .zoo import induction

        kind = None if model_class == "auto" else model_class
        try:
            model = induction.load(kind)
        except (RuntimeError, NotImplementedError) as e:
            raise UserError(f"could not load the embedded model: {_first_line(e)}") from None
        model._l3d_embedded = True  # marks the embedded task's data and vocabulary
    elif source == "local":
        path = Path(spec)
        if not path.exists():
            raise UserError(f"model directory {spec} does not exist")
        if not path.is_dir() or not (path / "config.json").is_file():
            shadow = "" if os.sep in spec or spec.startswith(".") else (
                f"; a folder named {spec} here is taken for a local model before the model name (e.g. an --out of "
                f"that name): run from another folder, or name the output otherwise")
            raise UserError(f"{spec} is not a Hugging Face model directory (needs config.json){shadow}")
        model = _load_local(path, model_class)
    else:
        if "/" in spec and (spec.startswith((".", "~")) or spec.startswith(os.sep)):
            raise UserError(f"model directory {spec} does not exist")
        model = _load_named(spec, model_class)
    if device:
        model = model.to(device)
    return model.eval()


def _check_device(device: Any, flag: str = "--device", fix: Optional[str] = None) -> None:
    """A device torch can name and this machine has, before any model is loaded. ``flag``
    names where it came from in messages (--device, or the config's device); ``fix``: the
    advice when this machine lacks the device."""
    if not isinstance(device, str):
        raise UserError(f"{flag} {device!r}: must be a string, e.g. cpu, cuda, cuda:1")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{flag} {device!r}: {_first_line(e)}; e.g. cpu, cuda, cuda:1") from None
    if dev.type == "meta":
        raise UserError(f"{flag} meta holds no weights to run; e.g. cpu, cuda, cuda:1")
    from .io import unavailable

    problem = unavailable(dev)
    if problem:
        advice = fix or ("use --device cpu" if flag == "--device" else "use cpu")
        raise UserError(f"{flag} {device}: {problem}; {advice}")


def _load_local(path: Path, model_class: str) -> torch.nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return _boot_local(path, model_class)
    except (OSError, ValueError, KeyError, AttributeError, ImportError, NotImplementedError) as e:
        # NotImplementedError: an architecture this TransformerLens does not support
        hint = ""
        if model_class == "hooked" and isinstance(e, AttributeError):  # a field TL's conversion reads, missing here
            hint = " (HookedTransformer's conversion of this config failed; --model-class bridge loads it as saved)"
        raise UserError(f"could not load the model in {path}: {_first_line(e)}{hint}") from None


def _boot_local(path: Path, model_class: str) -> torch.nn.Module:
    if model_class == "hooked":  # TL 3: the manual route works offline (from_pretrained wants a hub name)
        from transformer_lens import HookedTransformer
        from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        with _config_for_hooked(path, hf.config) as config_dir:
            cfg = get_pretrained_model_config(str(config_dir), hf_cfg=hf.config.to_dict(), fold_ln=True)
        cfg.model_name = str(path).split(os.sep)[-1]  # as TransformerLens names it from path, not the copy
        if getattr(cfg, "tokenizer_name", None) == str(config_dir):  # the user's folder, not the deleted copy
            cfg.tokenizer_name = str(path)
        model = HookedTransformer(cfg, tokenizer)
        model.load_and_process_state_dict(get_pretrained_state_dict(str(path), cfg, hf), fold_ln=True)
        return model
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(path))


@contextlib.contextmanager
def _config_for_hooked(path: Path, config):
    """The folder whose config.json TransformerLens's HookedTransformer conversion reads: ``path``
    itself, or, for a GPT-2 config saved without ``n_ctx`` (current transformers write only
    ``n_positions``, the same number, and TL 3 reads ``n_ctx``), a temporary folder of the same
    name holding the loaded ``config`` with ``n_ctx`` set; the user's files are left alone."""
    if getattr(config, "model_type", None) != "gpt2" or hasattr(config, "n_ctx") or not hasattr(config, "n_positions"):
        yield path
        return
    config.n_ctx = config.n_positions
    with tempfile.TemporaryDirectory(prefix="l3d-lens-config-") as tmp:
        folder = Path(tmp) / (path.resolve().name or "model")
        config.save_pretrained(folder)
        yield folder


def _load_named(name: str, model_class: str) -> torch.nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # HookedTransformer is deprecated in TL 3.x
            if model_class == "hooked" or (model_class == "auto" and _has_hooked()):
                from transformer_lens import HookedTransformer

                return HookedTransformer.from_pretrained(name)
            from transformer_lens.model_bridge import TransformerBridge

            return TransformerBridge.boot_transformers(name)
    except Exception as e:  # noqa: BLE001 - hub, network and name errors all become one line
        why = _first_line(e).split(". Valid official model names")[0]
        raise UserError(f"could not load model {name!r}: {why} (a TransformerLens model name needs the Hugging Face "
                        f"hub or its cache; offline, pass a local model directory)") from None


def _first_line(e: BaseException) -> str:
    """The first line of an error's message, whole: it may end in a long list of valid choices."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --- data --------------------------------------------------------------------------------------


def _tokenizer(model: torch.nn.Module):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise UserError("this model has no tokenizer, so text data cannot be used; pass token ids (.pt) instead")
    return tok


def _pack(model: torch.nn.Module, texts: Iterable[str], seq_len: int, max_sequences: int) -> torch.Tensor:
    """Tokenize without the tokenizer's own special tokens, join documents with one
    end-of-text token each and cut into sequences of ``seq_len`` tokens, each starting with
    one BOS when the tokenizer has one. (TransformerLens makes its tokenizers prepend BOS, so
    ``tok(text)`` alone would give two per document.) ``texts`` are read only until
    ``max_sequences`` sequences are full."""
    tok = _tokenizer(model)
    bos = getattr(tok, "bos_token_id", None)
    eos = getattr(tok, "eos_token_id", None)
    body = seq_len - (1 if bos is not None else 0)
    if body < 1:
        raise UserError(f"--seq-len {seq_len} is too short")
    stream: list[int] = []
    n_text = 0  # tokens the texts themselves gave (not the end-of-text ones added)
    any_text = False  # a text that is not blank
    for text in texts:
        if _blank(text):
            continue
        any_text = True
        try:
            ids = tok(text, add_special_tokens=False)["input_ids"]
        except TypeError:  # a tokenizer without the option adds none
            ids = tok(text)["input_ids"]
        stream.extend(int(i) for i in ids)
        n_text += len(ids)
        if eos is not None:
            stream.append(int(eos))
        if len(stream) >= body * max_sequences:
            break
    if n_text == 0 and any_text:
        raise UserError(f"the model's tokenizer ({_tokenizer_size(tok)}) turns the text into no tokens: does the model "
                        f"folder have its tokenizer files (tokenizer.json, or vocab.json and merges.txt)? Or pass "
                        f"token ids (.pt)")
    n = min(max_sequences, len(stream) // body)
    if n == 0:
        raise UserError(f"the data give {len(stream)} tokens, fewer than one sequence of {seq_len}")
    x = torch.tensor(stream[: n * body], dtype=torch.long).reshape(n, body)
    if bos is not None:
        x = torch.cat([torch.full((n, 1), int(bos), dtype=torch.long), x], 1)
    return x


def _tokenizer_size(tok) -> str:
    """``a tokenizer of N entries``, or its class name where it has no length."""
    try:
        return f"a {type(tok).__name__} of {len(tok)} entries"
    except TypeError:
        return f"a {type(tok).__name__}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Lazy:
    """An iterable that calls ``make(*args)`` for each pass: data read only as far as it is used."""

    def __init__(self, make: Callable[..., Iterator], *args: Any):
        self.make, self.args = make, args

    def __iter__(self) -> Iterator:
        return iter(self.make(*self.args))


def _first(source: Iterable) -> None:
    """Read ``source`` up to its first item, so that a file of the wrong form is refused before
    the model loads; the rest is checked as it is read."""
    next(iter(source), None)


def _column_values(ds, name: str) -> Iterator:
    """A saved dataset's column, row by row, read in batches of that column alone (not the
    whole column at once; row by row with every column is many times slower)."""
    for rows in ds.select_columns([name]).iter(batch_size=1000):
        yield from rows[name]


def _dataset_texts(path: Path, ds, name: str) -> Iterator[str]:
    for i, t in enumerate(_column_values(ds, name)):
        if _blank(t):
            continue  # blank or missing rows, as TokenStream skips them
        if not isinstance(t, str):
            raise UserError(f"{path}: row {i} of column {name!r} is {_short(t)}, not a string "
                            f"(choose the text column with --text-column)")
        yield t


def _texts_from_dataset(path: Path, column: Optional[str], split: Optional[str]):
    """(texts, None) or (None, token id rows), each read lazily. ``column`` None: the ``text``
    column, else an ``input_ids``/``tokens`` column; a column the user named must exist."""
    try:
        import datasets
    except ImportError:
        raise UserError("reading a saved Hugging Face dataset needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a dataset saved with save_to_disk ({_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in ds else sorted(ds)[0]
        if split not in ds:
            raise UserError(f"{path}: no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    name = column or "text"
    if name in ("input_ids", "tokens") and name in ds.column_names:
        return None, _Lazy(_column_values, ds, name)
    if name not in ds.column_names:
        if column is None:  # not named by the user: token ids will do
            for ids_col in ("input_ids", "tokens"):
                if ids_col in ds.column_names:
                    return None, _Lazy(_column_values, ds, ids_col)
        raise UserError(f"{path}: no column {name!r}; it has {ds.column_names} (choose one with --text-column)")
    texts = _Lazy(_dataset_texts, path, ds, name)
    _first(texts)
    return texts, None


def _texts_from_json(path: Path, column: str) -> list[str]:
    """A .json file: an array of strings, or of objects with a ``column`` string field."""
    formats = "(or use .jsonl, text files, .pt token ids or a saved dataset)"
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 JSON file") from None
    if not isinstance(items, list):
        raise UserError(f"{path}: a .json data file must hold a JSON array of strings or of objects with a "
                        f"{column!r} field, not a {type(items).__name__} {formats}")
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            if column not in item:
                raise UserError(f"{path}: item {i}: no {column!r} field (choose one with --text-column)")
            item = item[column]
            if _blank(item):
                continue
            if not isinstance(item, str):
                raise UserError(f"{path}: item {i}: the {column!r} field is {_short(item)}, not a string")
        elif _blank(item):
            continue
        elif not isinstance(item, str):
            raise UserError(f"{path}: item {i}: {_short(item)} is neither a string nor an object with a "
                            f"{column!r} field")
        texts.append(item)
    return texts


def _texts_from_jsonl(path: Path, column: str) -> Iterator[str]:
    """The texts of a .jsonl file, read a line at a time. Lines end at a line feed, CR LF or CR
    (universal newlines) only: a JSON string may hold U+2028, U+2029 or U+0085, where
    ``str.splitlines`` splits too."""
    with path.open(encoding="utf-8") as f:
        lines = enumerate(f)
        while True:
            try:
                i, line = next(lines)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise UserError(f"{path}: not a UTF-8 JSON lines file") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)[column]
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                raise UserError(f"{path}:{i + 1}: not a JSON object with a {column!r} field") from None
            if _blank(value):
                continue
            if not isinstance(value, str):
                raise UserError(f"{path}:{i + 1}: the {column!r} field is {_short(value)}, not a string")
            yield value


def _text_file(path: Path) -> Iterator[str]:
    """A text file's content: one document."""
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _not_text(path) from None


def _check_utf8_start(path: Path) -> None:
    """A text file's first 64 KiB must be UTF-8 (a character cut at their end is no error), so
    that another kind of file is refused before the model loads; the rest is read when used."""
    with path.open("rb") as f:
        start = f.read(1 << 16)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(start)
    except UnicodeDecodeError:
        raise _not_text(path) from None


def _not_text(path: Path) -> UserError:
    return UserError(f"{path}: not a UTF-8 text file (text, .jsonl, .json, .pt token ids or a saved dataset)")


def _blank(text: Any) -> bool:
    """A missing (null) or blank text, which every data reader skips (as TokenStream and the
    dataset readers do: WikiText has many)."""
    return text is None or (isinstance(text, str) and not text.strip())


NEEDS_DATA = "--data is required for this model (text files, .jsonl, .json, .pt token ids or a saved dataset)"


def check_seq_len(seq_len: Optional[int]) -> None:
    """--seq-len's lower bound, checked before the model loads (its upper one is the model's n_ctx)."""
    if seq_len is not None and seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (and at most the model's n_ctx), got {seq_len}")


@dataclass
class RawData:
    """Data files opened and checked without the model, so that a bad file stops a command
    before the model loads; what needs the model (tokenizing, its n_ctx and vocabulary) comes in
    ``tokens_from``. ``texts``: the text sources in the files' order, each an iterable of texts;
    ``ids``: token ids in the files' order, each a tensor (a .pt file) or a saved dataset's
    ``(path, rows)``, cut to the sequence length once it is known. Text files, .jsonl files and
    saved datasets are read lazily, as far as ``tokens_from`` needs them (a corpus much larger
    than --max-sequences is not read whole); their start is checked here."""

    paths: list[str]
    texts: list[Iterable[str]] = field(default_factory=list)
    ids: list = field(default_factory=list)


def read_data(paths: list[str], *, text_column: Optional[str] = None, split: Optional[str] = None) -> RawData:
    """Open and check ``paths`` (see ``load_data``) without a model."""
    column = text_column or "text"
    raw = RawData(list(paths))
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise UserError(f"data {p} does not exist")
        suffix = path.suffix.lower()
        if path.is_dir():
            col, ids = _texts_from_dataset(path, text_column, split)
            if col is not None:
                raw.texts.append(col)
            else:
                raw.ids.append((path, ids))
        elif suffix == ".pt":
            raw.ids.append(_token_ids_file(path))
        elif suffix == ".jsonl":
            raw.texts.append(_Lazy(_texts_from_jsonl, path, column))
            _first(raw.texts[-1])
        elif suffix == ".json":
            raw.texts.append(_texts_from_json(path, column))
        else:
            _check_utf8_start(path)
            raw.texts.append(_Lazy(_text_file, path))
    return raw


def _token_ids_file(path: Path) -> torch.Tensor:
    """The integer tensor [n, seq] of token ids a .pt file holds."""
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot read token ids ({_first_line(e)})") from None
    if (not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype == torch.bool or t.is_floating_point()
            or t.is_complex()):
        got = (f"a {t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor)
               else f"a {type(t).__name__}")
        raise UserError(f"{path}: expected an integer tensor of token ids [n, seq], got {got}")
    if t.numel() == 0:
        raise UserError(f"{path}: holds no token ids (shape {list(t.shape)})")
    return t.long()


def load_data(model: torch.nn.Module, paths: list[str], *, seq_len: Optional[int], max_sequences: int,
              text_column: Optional[str] = None, split: Optional[str] = None, seed: int = 0) -> torch.Tensor:
    """Token ids [n, seq] from: nothing (the embedded model's own task), .pt files of token
    ids, text files (.txt/.md/...), .jsonl (``text_column``, default ``text``), .json (an
    array of strings or of objects with ``text_column``), or Hugging Face datasets saved with
    ``save_to_disk`` (``text_column``; when it is None, the ``text`` column or else an
    ``input_ids``/``tokens`` column)."""
    from .adapters import make_adapter

    _data_limits(make_adapter(model), seq_len, max_sequences)  # before reading the files
    return tokens_from(model, read_data(paths, text_column=text_column, split=split), seq_len=seq_len,
                       max_sequences=max_sequences, seed=seed)


def _data_limits(adapter, seq_len: Optional[int], max_sequences: int) -> int:
    """Check ``max_sequences`` and ``seq_len`` against the model (its adapter); its n_ctx (1024
    where unknown)."""
    if isinstance(max_sequences, bool) or not isinstance(max_sequences, int) or max_sequences < 1:
        raise UserError(f"max_sequences must be an int >= 1, got {max_sequences!r}")
    n_ctx = adapter.n_ctx or 1024
    if seq_len is not None and not 2 <= seq_len <= n_ctx:
        raise UserError(f"--seq-len must be between 2 and the model's n_ctx={n_ctx}, got {seq_len}")
    return n_ctx


def tokens_from(model: torch.nn.Module, raw: RawData, *, seq_len: Optional[int], max_sequences: int,
                seed: int = 0) -> torch.Tensor:
    """``load_data``'s token ids from data ``read_data`` has read: texts tokenized by the model,
    dataset rows cut to ``seq_len`` (default min(32, n_ctx)), all checked against its n_ctx
    and vocabulary."""
    from .adapters import make_adapter

    adapter = make_adapter(model)
    n_ctx = _data_limits(adapter, seq_len, max_sequences)
    if not raw.paths:
        if _is_embedded(model):
            from .zoo import induction

            return induction.repeated_sequences(max_sequences, seed=seed)
        raise UserError(NEEDS_DATA)
    seq_len = seq_len or min(32, n_ctx)
    tensors: list[torch.Tensor] = []
    n_rows = 0
    for item in raw.ids:
        if isinstance(item, torch.Tensor):
            tensors.append(item)
        else:
            path, ids = item
            tensors.append(_id_rows(path, ids, seq_len, max(1, max_sequences - n_rows)))
        n_rows += len(tensors[-1])
    texts = _all_texts(raw)
    if texts is not None:
        tensors.append(_pack(model, texts, seq_len, max_sequences))
    if not tensors:
        raise UserError(f"the data ({', '.join(raw.paths)}) hold no text or token ids")
    lengths = {t.shape[1] for t in tensors}
    if len(lengths) > 1:
        raise UserError(f"the data give sequences of different lengths {sorted(lengths)}; use one kind of data")
    x = torch.cat(tensors)[:max_sequences]
    if adapter.d_vocab is not None and (x.min() < 0 or x.max() >= adapter.d_vocab):
        raise UserError(f"the data hold token ids outside [0, {adapter.d_vocab}) (the model's vocabulary)")
    if x.shape[1] > n_ctx:
        raise UserError(f"the data have sequences of {x.shape[1]} tokens, more than the model's n_ctx={n_ctx}")
    return x


def _id_rows(path: Path, ids: Iterable, seq_len: int, n: int) -> torch.Tensor:
    """The first ``n`` rows of a saved dataset's token ids that have ``seq_len`` tokens, cut to
    ``seq_len``; the rows after them are not read (only ``max_sequences`` rows are used)."""
    rows = []
    for r in ids:
        if len(r) >= seq_len:
            rows.append(list(r)[:seq_len])
            if len(rows) == n:
                break
    if not rows:
        raise UserError(f"{path}: no token row has {seq_len} tokens (lower --seq-len)")
    return torch.tensor(rows, dtype=torch.long)


def _all_texts(raw: RawData) -> Optional[Iterator[str]]:
    """The texts of all of ``raw``'s text sources in order, read as used; None where they hold
    none at all (then there is nothing to pack)."""
    texts = itertools.chain.from_iterable(raw.texts)
    first = next(texts, None)  # texts are strings: None is the end
    return None if first is None else itertools.chain([first], texts)


def _is_embedded(model: torch.nn.Module) -> bool:
    return getattr(model, "_l3d_embedded", False) is True


def to_str_for(model: torch.nn.Module):
    """Token strings for reports: the embedded vocabulary (words with a leading space), or
    the model's tokenizer one token at a time, or the ids."""
    if _is_embedded(model):
        from .zoo import induction

        return induction.to_str_words
    return None


# --- configuration -------------------------------------------------------------------------------

CONFIG_FLAGS = ("components", "n_subnetworks", "rank", "top_k", "divergence", "sample", "position", "epochs",
                "batch_size", "lr", "lr_decay", "lr_step", "seed", "device", "dtype", "engine")


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _position(text: str):
    return "all" if text == "all" else _number(text)


#: the L3DConfig fields that hold numbers (rank, position and the optional ones may hold others too)
NUMBER_FIELDS = ("n_subnetworks", "rank", "top_k", "position", "epochs", "batch_size", "lr", "lr_decay", "lr_step",
                 "seed", "aux_coef", "dead_steps", "aux_epochs", "resample_max", "loss_norm_epochs")


def _as_number(name: str, value: Any) -> Any:
    """A string that is a number (as the flags read it) as that number for a numeric field:
    YAML reads 1e-3 (no dot) as a string, and --set .001 is no JSON."""
    if name in NUMBER_FIELDS and isinstance(value, str):
        try:
            return _number(value.strip())
        except argparse.ArgumentTypeError:
            return value
    return value


def read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file {path} is a folder; name a YAML or JSON file")
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"config file {path}: not a UTF-8 text file (write the config as YAML or JSON)") from None
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UserError("YAML config files need PyYAML: pip install pyyaml (or write the config as JSON)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"{path}: invalid YAML ({_first_line(e)})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the config must be a mapping of L3DConfig fields")
    return {name: _as_number(name, value) for name, value in data.items()}


#: --set values written as Python writes them, read as JSON's true, false and null
_PYTHON_LITERALS = {"True": True, "False": False, "None": None}


def build_config(args: argparse.Namespace):
    from .config import L3DConfig

    settings: dict[str, Any] = read_config_file(args.config) if args.config else {}
    for name in CONFIG_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    if args.no_biases:
        settings["include_biases"] = False
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: write FIELD=VALUE, e.g. --set aux_coef=0.1")
        try:
            settings[key.strip()] = _PYTHON_LITERALS[raw.strip()] if raw.strip() in _PYTHON_LITERALS else json.loads(raw)
        except json.JSONDecodeError:
            settings[key.strip()] = _as_number(key.strip(), raw)
    if "components" not in settings:
        raise UserError("no components to decompose: pass --components (e.g. blocks.0.attn) or a config file")
    if settings.get("reference") == "paired":
        raise UserError("reference='paired' (contrastive L3D) needs a reference input paired with each sample, which "
                        "no flag of the CLI takes; run it from Python (decompose(model, data, cfg, reference=...)) "
                        "or choose random, mean, uniform or zero")
    return L3DConfig.from_dict(settings)


# --- commands ------------------------------------------------------------------------------------


def _threads(args: argparse.Namespace) -> None:
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)


#: the most the CLI adds to a seed for its other draws: the patching pairs' seed + 100, and + 1
#: for their corruption (the report's data: the recorded data seed + 1)
SEED_OFFSET = 101
#: the seeds the --seed and --data-seed flags take: with every offset, seeds a torch generator takes
CLI_SEEDS = (SEED_RANGE[0], SEED_RANGE[1] - SEED_OFFSET)
CLI_SEEDS_TEXT = f"-2**63 .. 2**64 - {SEED_OFFSET + 1}"


def _seed(text: str) -> int:
    """argparse type of the seed flags: an int in CLI_SEEDS (argparse names the flag), so that
    every seed derived from it is one a torch generator takes; checked before any work."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int, got {text!r}") from None
    if not CLI_SEEDS[0] <= n <= CLI_SEEDS[1]:
        raise argparse.ArgumentTypeError(f"must be an int in {CLI_SEEDS_TEXT} (the seeds a torch generator takes, "
                                         f"less the {SEED_OFFSET} added for the command's other draws), got {text}")
    return n


def _count(text: str) -> int:
    """argparse type of the count flags: an int >= 1 (argparse names the flag)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return n


def _blocking_file(path: Path) -> Optional[Path]:
    """The first existing parent of ``path`` that is not a folder (so nothing can be written there)."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def _dangling_link(path: Path, flag: str, itself: bool = True) -> None:
    """UserError naming ``path`` (where ``itself``) or the folder above it that is a symbolic link
    to nothing: no folder can be made there, and the check of the nearest existing folder passes
    over it. (A report written through a link to a missing file makes that file.)"""
    for p in ((path,) if itself else ()) + tuple(path.parents):
        if p.is_symlink() and not p.exists():
            where = "" if p == path else f": {p}"
            raise UserError(f"{flag} {path}{where} is a symbolic link to {os.readlink(p)}, which does not exist")


def _check_folder(path: Path, flag: str = "--out") -> Path:
    """An output folder that exists or can be made, checked before any work."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} exists and is not a folder")
    _dangling_link(path, flag)
    blocking = _blocking_file(path)
    if blocking is not None:
        raise UserError(f"{flag} {path}: {blocking} is not a folder")
    _check_writable(path, path, flag)
    return path


def _report_path(path: Any, flag: str = "--out") -> Path:
    """An .html file that can be written, checked before any work."""
    p = Path(path)
    if p.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"report path must end in .html, got {path}")
    if p.is_dir():
        raise UserError(f"{flag} {path} is a folder; name the .html file to write")
    _dangling_link(p, flag, itself=False)
    blocking = _blocking_file(p)
    if blocking is not None:
        raise UserError(f"{flag} {path}: {blocking} is not a folder")
    _check_writable(p.parent, p, flag)
    return p


def _check_writable(folder: Path, shown: Path, flag: str) -> None:
    """UserError unless files can be made in ``folder`` (or, where it does not exist yet, in its
    nearest existing ancestor, where it will be made): a temporary file is created there and
    deleted, so nothing is left behind. os.access alone would miss read-only mounts, /proc and
    immutable folders, and says yes to root everywhere."""
    base = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {shown}: not writable (no permission to write in {base})")
    try:
        fd, name = tempfile.mkstemp(prefix=".l3d-lens-check-", dir=base)
    except OSError as e:
        raise UserError(f"{flag} {shown}: not writable (cannot create a file in {base}: {e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def _sha256(file: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (factors may be large)."""
    h = hashlib.sha256()
    with file.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest(folder: Path) -> Optional[dict[str, str]]:
    """The {file name: SHA-256} that l3d-lens keeps in ``folder`` ({} where there is none yet;
    None where a file of that name is not such a manifest)."""
    file = folder / MANIFEST
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError too
        return None
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        return data
    return None


def _by_folder(files: list[Path]) -> dict[Path, list[str]]:
    """File names grouped by their folder, each folder keeping one manifest."""
    folders: dict[Path, list[str]] = {}
    for f in files:
        folders.setdefault(f.parent, []).append(f.name)
    return folders


def _check_outputs(files: list[Path], overwrite: bool) -> None:
    """Before any work: each of ``files`` (what the command will write) that exists already must
    be an unchanged earlier output of l3d-lens, listed with its current SHA-256 in its folder's
    MANIFEST, so a rerun replaces its own outputs but never a user's file; --overwrite
    (``overwrite``) lifts this. A folder where a file is to go is refused either way."""
    for folder, names in _by_folder(files).items():
        for name in (*names, MANIFEST):
            if (folder / name).is_dir():
                raise UserError(f"{folder / name} is a folder, where l3d-lens would write a file")
    if overwrite:
        return
    taken = []
    for folder, names in _by_folder(files).items():
        manifest = _manifest(folder)
        if manifest is None:
            taken.append(folder / MANIFEST)
            manifest = {}
        taken += [folder / n for n in names if (folder / n).exists() and manifest.get(n) != _sha256(folder / n)]
    if taken:
        raise UserError(f"would overwrite {', '.join(str(f) for f in taken)} (not recorded in {MANIFEST}: another "
                        f"program's file, an earlier l3d-lens's, one changed since, or one an interrupted run wrote "
                        f"before recording it); move them or pass --overwrite to replace them")


def _record_outputs(files: list[Path]) -> None:
    """Add ``files``, just written, with their SHA-256 to their folders' MANIFEST (replaced
    whole, so a reader never sees half of it)."""
    for folder, names in _by_folder(files).items():
        manifest = _manifest(folder) or {}
        manifest.update({n: _sha256(folder / n) for n in names if (folder / n).is_file()})
        tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, folder / MANIFEST)


def _patching_available() -> tuple[bool, str]:
    try:
        from .patching import compare_with_patching  # noqa: F401
    except ImportError as e:
        return False, f"activation-patching comparison skipped: l3d_lens.patching is not available ({e})"
    return True, ""


def induction_pairs(n: int, seed: int):
    """Clean repeated sequences and corrupted ones whose first half is different words (the
    second half can no longer be predicted by looking back), and a metric: the mean log
    probability of the clean second-half tokens that induction predicts."""
    from .zoo import induction

    half = induction.HALF
    clean = induction.repeated_sequences(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    corrupted = clean.clone()
    corrupted[:, 1 : half + 1] = torch.randint(1, len(induction.VOCAB), (n, half), generator=g)
    targets = clean[:, half + 2 :]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        lp = logits[:, half + 1 : -1].log_softmax(-1)
        return lp.gather(-1, targets[..., None].to(lp.device)).mean()

    return clean, corrupted, metric


def _summary_lines(dec, data: torch.Tensor, half: Optional[int] = None) -> list[str]:
    """Per subnetwork: with attention and MLP weights both decomposed, the split between them
    and the top units across both; else the top heads when attention heads are decomposed, else
    the top MLP neurons, else the top weights."""
    df = dec.attribution()
    parts = df["weight"].map(_part)
    if {"attn", "mlp"} <= set(parts):
        return _summary_mixed(dec, df.assign(part=parts))
    if df["head"].notna().any():
        return _summary_table(dec, data, half)
    p_act = dec.fraction_active
    order = torch.argsort(p_act, descending=True, stable=True).tolist()
    if df["neuron"].notna().any():
        norms = dec.neuron_attribution()
        effects = dec.neuron_effects()
        if len(effects):
            total = effects.groupby("subnetwork")["effect"].transform("sum")
            effects = effects.assign(share=effects["effect"] / total.where(total > 0, 1.0))

        def top(frame, k):
            rows = frame[frame.subnetwork == k].nlargest(3, "share")
            return ", ".join(f"L{int(r.layer)}N{int(r.neuron)} {r.share:.2f}" for r in rows.itertuples())

        lines = [f"{'subnet':>6} {'P_act':>6}  {'top neurons (share of squared norm)':<40}"
                 + (f" {'top neurons (share of output effect)':<40}" if len(effects) else "")]
        for k in order:
            lines.append(f"{k:>6} {p_act[k]:>6.3f}  {top(norms, k):<40}"
                         + (f" {top(effects, k):<40}" if len(effects) else ""))
        return lines
    weights = df.groupby(["subnetwork", "weight"], as_index=False)["share"].sum()
    lines = [f"{'subnet':>6} {'P_act':>6}  top weights (share of squared norm)"]
    for k in order:
        rows = weights[weights.subnetwork == k].nlargest(3, "share")
        lines.append(f"{k:>6} {p_act[k]:>6.3f}  " + ", ".join(f"{r.weight} {r.share:.2f}" for r in rows.itertuples()))
    return lines


def _part(weight: str) -> str:
    """attn, mlp or other: where a decomposed weight (a TransformerLens name) sits."""
    names = weight.split(".")
    return "attn" if "attn" in names else "mlp" if "mlp" in names else "other"


def _summary_mixed(dec, df) -> list[str]:
    """Per subnetwork: its squared norm split over attention, MLP and other weights, and its 3
    top units across all of them (heads LxHy, neurons LxNy, or whole weights such as biases), as
    shares of its whole squared norm, so that a subnetwork living in the MLP does not read as a
    head circuit."""
    split = df.pivot_table(index="subnetwork", columns="part", values="share", aggfunc="sum", fill_value=0.0)
    layer = df["layer"].astype("string")
    unit = df["weight"].astype("string")
    unit = unit.mask(df["neuron"].notna(), "L" + layer + "N" + df["neuron"].astype("string"))
    unit = unit.mask(df["head"].notna(), "L" + layer + "H" + df["head"].astype("string"))
    units = df.assign(unit=unit).groupby(["subnetwork", "unit"], as_index=False)["share"].sum()
    p_act = dec.fraction_active
    lines = [f"{'subnet':>6} {'P_act':>6} {'attn':>6} {'mlp':>6} {'other':>6}  top units (share of squared norm)"]
    for k in torch.argsort(p_act, descending=True, stable=True).tolist():
        share = {part: float(split.loc[k, part]) if part in split.columns else 0.0 for part in ("attn", "mlp", "other")}
        rows = units[units.subnetwork == k].nlargest(3, "share")
        lines.append(f"{k:>6} {p_act[k]:>6.3f} {share['attn']:>6.2f} {share['mlp']:>6.2f} {share['other']:>6.2f}  "
                     + ", ".join(f"{r.unit} {r.share:.2f}" for r in rows.itertuples()))
    return lines


def _summary_table(dec, data: torch.Tensor, half: Optional[int] = None) -> list[str]:
    heads = dec.head_attribution(as_tensor=True)
    effects = dec.head_effects(as_tensor=True, share=True)
    p_act = dec.fraction_active
    lines = [f"{'subnet':>6} {'P_act':>6}  {'top heads (share of squared norm)':<40} {'top heads (share of output effect)':<40}"
             + (f" {'|c| repeated/first half':>24}" if half else "")]
    ratio = None
    if half:
        probe = data[: min(64, len(data))]
        coef = dec.coefficients(probe).abs().reshape(len(probe), probe.shape[1], -1)
        ratio = coef[:, half + 1 :].mean((0, 1)) / coef[:, 1 : half + 1].mean((0, 1)).clamp_min(1e-12)
    def top(shares: torch.Tensor) -> str:
        """The 3 heads with the largest share, leaving out heads with none (e.g. of layers or
        heads not decomposed)."""
        flat = shares.flatten()
        order = torch.argsort(flat, descending=True, stable=True)[:3].tolist()
        return ", ".join(f"L{i // shares.shape[1]}H{i % shares.shape[1]} {flat[i]:.2f}" for i in order if flat[i] > 0)

    for k in torch.argsort(p_act, descending=True, stable=True).tolist():
        desc, desc_e = top(heads[k]), top(effects[k])
        lines.append(f"{k:>6} {p_act[k]:>6.3f}  {desc:<40} {desc_e:<40}"
                     + (f" {ratio[k].item():>24.1f}" if ratio is not None else ""))
    return lines


def _demo(args: argparse.Namespace) -> int:
    """Decompose the embedded induction model, compare with patching, write the report."""
    from importlib.metadata import version

    from . import L3DConfig, decompose
    from .zoo import induction

    _threads(args)
    start = time.perf_counter()
    out = _check_folder(Path(args.out))
    _check_folder(out / "decomposition")
    if not args.no_report:
        _report_path(out / "report.html")
    _check_outputs(_decomposition_files(out / "decomposition")
                   + ([] if args.no_compare else [out / "comparison_heads.csv"])
                   + ([] if args.no_report else [out / "report.html"]), args.overwrite)
    cfg = L3DConfig(components=["blocks.0.attn", "blocks.1.attn"], n_subnetworks=args.n_subnetworks, rank=4,
                    top_k=0.1, sample="token", epochs=args.epochs, batch_size=32, lr=0.01, lr_step=4,
                    include_biases=False, seed=args.seed)
    model = induction.load()
    model._l3d_embedded = True
    data = induction.repeated_sequences(args.n_sequences, seed=args.seed)
    print(f"l3d-lens demo: {type(model).__name__} (transformer-lens {version('transformer-lens')}), "
          f"2-layer attention-only model trained on repeated random words; torch threads: {args.threads}")
    first, second = induction.induction_loss(model)
    print(f"model loss on the first half {first:.3f} nats, on the repeated half {second:.4f} nats (induction)")
    dec = decompose(model, data, cfg, progress=not args.quiet)
    dec.save(out / "decomposition")
    _write_record(out / "decomposition", {"model": "induction", "model_class": "auto", "data": [],
                                          "seed": args.seed, "max_sequences": args.n_sequences})
    _record_outputs(_decomposition_files(out / "decomposition"))
    print(f"\nreconstruction error {dec.history[-1]['loss']:.3f} (training, mean over the last epoch), dead "
          f"subnetworks {dec.history[-1]['n_dead']}/{dec.n_subnetworks}")
    print("\n".join(_summary_table(dec, data, induction.HALF)))
    print(f"\nsaved to {out / 'decomposition'} (safetensors + JSON)")

    comparison = None
    if not args.no_compare:
        ok, why = _patching_available()
        if not ok:
            print(why)
        else:
            from .patching import compare_with_patching

            clean, corrupted, metric = induction_pairs(args.n_pairs, seed=args.seed + 100)
            print(f"\nactivation patching vs attribution patching vs contrastive L3D on {args.n_pairs} (clean, "
                  f"corrupted-first-half) pairs, metric: log p(repeated token)")
            comparison = compare_with_patching(model, clean, corrupted, metric, direction="denoise",
                                               progress=not args.quiet)
            print(comparison.summary())
            comparison.heads.to_csv(out / "comparison_heads.csv", index=False)
            _record_outputs([out / "comparison_heads.csv"])
    if not args.no_report:
        from .viz import report

        held_out = induction.repeated_sequences(args.report_sequences, seed=args.seed + 1)
        path = report(dec, held_out, out / "report.html", comparison=comparison, to_str=to_str_for(model),
                      progress=not args.quiet, title="L3D report: the embedded induction model")
        _record_outputs([out / "report.html"])  # the name checked before (``path``: where a symlink there points)
        print(f"\nreport: {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained; open it in a browser)")
    skipped = {out / "comparison_heads.csv": "--no-compare" if args.no_compare else None,
               out / "report.html": "--no-report" if args.no_report else None}
    stale = [f"{f} ({flag})" for f, flag in skipped.items() if flag and f.exists()]
    if stale:
        print(f"note: {', '.join(stale)} in {out} are not from this run, which skipped them; they describe an earlier "
              f"decomposition (delete them, or rerun without the flag to replace them)", file=sys.stderr)
    print(f"wall time {time.perf_counter() - start:.1f} s")
    return 0


def _write_record(folder: Path, record: dict[str, Any]) -> None:
    (folder / RECORD).write_text(json.dumps(record, indent=1))


def _decomposition_files(folder: Path) -> list[Path]:
    """What saving a decomposition from the command line writes in ``folder``: the two files of
    ``Decomposition.save`` (which replaces them and leaves other files alone) and the record."""
    from .io import FACTORS, META

    return [folder / META, folder / FACTORS, folder / RECORD]


#: the fields of a RECORD that ``_load_saved`` reads: field -> (check, what it must be)
_RECORD_FIELDS = {
    "model": (lambda v: isinstance(v, str) and v != "", "a non-empty string (the model's name or folder)"),
    "model_source": (lambda v: v in MODEL_SOURCES, f"one of {', '.join(map(repr, MODEL_SOURCES))}"),
    "model_class": (lambda v: v in ("auto", "hooked", "bridge"), "one of 'auto', 'hooked', 'bridge'"),
    "data": (lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v), "a list of paths (strings)"),
    "seed": (is_int, "an integer (the data seed)"),
    "seq_len": (lambda v: v is None or is_int(v), "an integer or null"),
    "text_column": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "split": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


def _read_record(folder: Path) -> dict[str, Any]:
    """The record ``decompose`` wrote next to a saved decomposition ({} where there is none):
    a JSON object whose fields that ``_load_saved`` reads have their types; UserError naming the
    file and the field otherwise, before any model is loaded."""
    path = folder / RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 JSON file") from None
    fix = "fix it or delete the file and pass --model and --data"
    if not isinstance(record, dict):
        raise UserError(f"{path} must hold a JSON object (as decompose writes it), got {reprlib.repr(record)}; {fix}")
    for key, (ok, what) in _RECORD_FIELDS.items():
        if key in record and not ok(record[key]):
            raise UserError(f"{path}: {key!r} must be {what}, got {reprlib.repr(record[key])}; {fix}")
    if not CLI_SEEDS[0] <= record.get("seed", 0) <= CLI_SEEDS[1]:  # report draws from seed + 1
        raise UserError(f"{path}: 'seed' must be in {CLI_SEEDS_TEXT}, as --data-seed, got {record['seed']}; {fix}")
    return record


def _decompose(args: argparse.Namespace) -> int:
    from . import decompose

    _threads(args)
    start = time.perf_counter()
    if args.device is not None:  # named as the flag (the config would name its own field)
        _check_device(args.device)
    cfg = build_config(args)
    _check_batch_size(cfg)
    _check_language_model_settings(cfg)
    out = _check_folder(Path(args.out))
    report_path = _report_path(args.report, "--report") if args.report else None
    _check_outputs(_decomposition_files(out) + ([report_path] if report_path else []), args.overwrite)
    if cfg.device is not None and cfg.device != args.device:  # from --config or --set (--device: checked above)
        _check_device(cfg.device, "--set/--config device")
    source = model_source(args.model)  # now: the output folder, made later, may take a model name's place
    check_seq_len(args.seq_len)  # a missing --data is named once the model loads, after its own load errors
    raw = read_data(args.data, text_column=args.text_column, split=args.split)  # before the model loads
    model = load_model(args.model, args.model_class, cfg.device)  # finds it as ``source`` says: nothing written yet
    _check_task(model, cfg)
    data = tokens_from(model, raw, seq_len=args.seq_len, max_sequences=args.max_sequences, seed=args.data_seed)
    _note_unused_data_flags(args, args.data)
    if not args.quiet:
        print(f"l3d-lens decompose: {type(model).__name__}, data {tuple(data.shape)}, components "
              f"{list(cfg.components)}, {cfg.n_subnetworks} subnetworks")
    dec = decompose(model, data, cfg, progress=not args.quiet)
    dec.save(out)
    _write_record(out, {"model": _model_record(args.model, source), "model_source": source,
                        "model_class": args.model_class, "data": [str(Path(p).resolve()) for p in args.data],
                        "seq_len": args.seq_len, "max_sequences": args.max_sequences, "text_column": args.text_column,
                        "split": args.split, "seed": args.data_seed})
    _record_outputs(_decomposition_files(out))
    last = dec.history[-1]
    print(f"reconstruction loss {last['loss']:.4f} (training, mean over the last epoch), dead {last['n_dead']}/"
          f"{dec.n_subnetworks}; saved to {out}")
    print("\n".join(_summary_lines(dec, data)))
    if report_path is not None:
        from .viz import report

        path = report(dec, data, report_path, to_str=to_str_for(model), progress=not args.quiet)
        _record_outputs([report_path])  # the name checked before (``path``: where a symlink there points)
        print(f"report: {path}")
    if not args.quiet:
        print(f"wall time {time.perf_counter() - start:.1f} s")
    return 0


def _check_batch_size(cfg) -> None:
    """``check_run``'s batch-size rule, before the model loads: every model the CLI loads is a
    language model, on which sample 'auto' means token mode."""
    from .task import min_batch

    need = min_batch(cfg.sample != "sequence", cfg.reference)
    if cfg.batch_size < need:
        raise UserError(f"--batch-size {cfg.batch_size} with reference {cfg.reference!r} and --sample sequence: a "
                        f"batch needs {need} sequences (a lone sample has no other to draw, and is its own mean); "
                        f"use --batch-size >= {need}, or --sample token")


class _LanguageModel:
    """What ``resolve_config`` reads of an adapter, for the models the CLI loads: all are
    language models."""

    is_language_model = True


def _check_language_model_settings(cfg) -> None:
    """``resolve_config``'s checks before the model loads: on a language model sample 'auto' is
    token mode (so --position needs --sample sequence) and divergence 'auto' is KL (so
    reference 'zero' needs --divergence mse); the same messages as after loading it."""
    from .decomposition import resolve_config

    resolve_config(_LanguageModel(), cfg)


def _check_task(model: torch.nn.Module, cfg) -> None:
    """``decompose``'s checks that need the model but no data (``build_task``: the selectors,
    ranks, tied weights and the fast engine's sites), once it loads and before the data are
    tokenized: a typo in --components stops the command before --max-sequences of text are
    read, with ``decompose``'s message. Its warnings are left to ``decompose``, said once."""
    from .decomposition import build_task

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_task(model, cfg)


def _model_record(spec: str, source: str) -> str:
    """``spec`` as the record keeps it, by how ``load_model`` found it (its ``model_source``):
    a local folder absolute, a name as given."""
    return str(Path(spec).resolve()) if source == "local" else spec


def _check_saved_files(folder: Path) -> None:
    """``folder`` holds the two files of a saved decomposition and its JSON reads as an object:
    checked before the model loads, with ``Decomposition.load``'s messages."""
    from .io import FACTORS, META, read_json_object

    if not (folder / META).is_file() or not (folder / FACTORS).is_file():
        raise UserError(f"{folder} is not a saved decomposition (needs {META} and {FACTORS})")
    read_json_object(folder / META, "Decomposition.save")


def _saved_config(folder: Path) -> dict:
    """The config a saved decomposition records, for the checks made before any model loads;
    {} where the file cannot be read that way (``Decomposition.load`` then says what is wrong)."""
    config = _saved_meta(folder).get("config")
    return config if isinstance(config, dict) else {}


def _saved_meta(folder: Path) -> dict:
    """A saved decomposition's JSON metadata; {} where it cannot be read (``Decomposition.load``
    then says what is wrong)."""
    from .io import META

    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _saved_device(folder: Path, config: dict, given: Optional[str]) -> Optional[str]:
    """Where ``report`` / ``compare`` put the model and the factors: ``--device`` if given, else
    the device the decomposition was computed on if this machine has it, else None (where the
    model loads; a note on stderr says so, or, for a device this torch cannot name,
    ``Decomposition.load``'s warning). A saved device that is not a string is an error here,
    before any model is loaded."""
    from .io import META, unavailable

    device = config.get("device")
    if device is None:
        return given
    if not isinstance(device, str):
        raise UserError(f"the saved decomposition's device {device!r}: must be a string, e.g. cpu, cuda; set "
                        f'"device" to null in {folder / META}')
    try:
        problem = unavailable(torch.device(device))
    except (RuntimeError, ValueError):  # a device of a torch extension: Decomposition.load warns and falls back
        return given
    if given is not None:
        return given
    if problem:
        print(f"l3d-lens: {folder} was computed on {device}, but {problem}; loading it where the model loads "
              f"(--device to choose)", file=sys.stderr)
        return None
    return device


def _load_saved(args: argparse.Namespace):
    """Model, decomposition and data for ``report`` / ``compare``, defaulting to what
    ``decompose`` recorded next to the decomposition."""
    folder = Path(args.decomposition)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder holding a saved decomposition")
    record = _read_record(folder)
    config = _saved_config(folder)
    _refuse_paired(folder, config)
    device = _saved_device(folder, config, args.device)
    spec = args.model or record.get("model")
    if not spec:
        _check_saved_files(folder)  # a folder that is none: said first
        raise UserError(f"--model is required ({folder} has no {RECORD} saying which model it was computed on)")
    if args.compare and spec not in EMBEDDED:  # before loading it
        raise UserError(COMPARE_EMBEDDED_ONLY)
    # the recorded model is read as it was found then (a folder made since may bear its name)
    source = model_source(spec) if args.model else record.get("model_source") or model_source(spec)
    paths = args.data if args.data else record.get("data", [])
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        where = "" if args.data else f" (recorded in {folder / RECORD}; pass --data to use other data)"
        raise UserError(f"data {missing[0]} does not exist{where}")
    seq_len, text_column, split = _data_settings(args, record)
    check_seq_len(seq_len)
    if not paths and source != "embedded":  # e.g. --model of a decomposition of the embedded model
        raise UserError(NEEDS_DATA)
    raw = read_data(paths, text_column=text_column, split=split)  # before the model loads
    _check_saved_files(folder)
    model = load_model(spec, args.model_class or record.get("model_class", "auto"), device, source=source)
    device = device or str(next(model.parameters()).device)  # the factors go where the model is
    dec = _load_decomposition(folder, model, args.no_check_weights, device)
    seed = record.get("seed", 0) + (1 if not args.data and not paths else 0)  # embedded task: fresh sequences
    data = tokens_from(model, raw, seq_len=seq_len, max_sequences=args.max_sequences, seed=seed)
    _note_unused_data_flags(args, paths)
    return model, dec, data


def _data_settings(args: argparse.Namespace, record: dict) -> tuple[Optional[int], Optional[str], Optional[str]]:
    """--seq-len, --text-column and --split, each defaulting to the one recorded with the
    decomposition's data only while that data is used: with --data, the flags alone."""
    if args.data:
        return args.seq_len, args.text_column, args.split
    recorded_column = record.get("text_column")  # "text" was also the recorded default: it may fall back
    return (args.seq_len or record.get("seq_len"),
            args.text_column or (None if recorded_column in (None, "text") else recorded_column),
            args.split or record.get("split"))


#: the --model-class that loads a model as each adapter kind a decomposition records
MODEL_CLASS_OF = {"hooked_transformer": "hooked", "transformer_bridge": "bridge"}


def _load_decomposition(folder: Path, model: torch.nn.Module, no_check_weights: bool, device: str):
    """``Decomposition.load`` with one-line errors. A decomposition computed on another model
    class than ``model``'s (a HookedTransformer folds LayerNorm into its weights, a bridge
    does not) has its weights checked even with --no-check-weights: where they differ, the
    fix is the --model-class it was computed with, not a report on other weights."""
    from .adapters import make_adapter
    from .decomposition import Decomposition

    saved, now = _saved_meta(folder).get("adapter"), make_adapter(model).kind
    other_class = saved != now and saved in MODEL_CLASS_OF and now in MODEL_CLASS_OF
    if other_class and no_check_weights:  # the check tells a wrong --model-class from a changed model
        try:
            return Decomposition.load(folder, model, check_weights=True, device=device)
        except ValueError as e:
            _refuse_other_class(folder, saved, now, e)
    try:
        return Decomposition.load(folder, model, check_weights=not no_check_weights, device=device)
    except ValueError as e:
        if other_class:
            _refuse_other_class(folder, saved, now, e)
        raise UserError(_first_line(e).replace("pass check_weights=False", "pass --no-check-weights")) from None


def _refuse_other_class(folder: Path, saved: str, now: str, error: ValueError) -> None:
    """UserError naming the --model-class to pass where ``error`` says the weights differ from
    those of a decomposition computed on a ``saved`` model, loaded as a ``now`` model."""
    if "differ from those the decomposition was computed on" not in _first_line(error):
        return
    need = MODEL_CLASS_OF[saved]
    lacks = "" if need != "hooked" or _has_hooked() else (
        ", which this TransformerLens lacks (removed in 4.0): report it where HookedTransformer exists")
    raise UserError(f"{folder} was computed on a {saved} model and this is a {now} model, whose weights differ (a "
                    f"HookedTransformer folds LayerNorm into them): pass --model-class {need}{lacks}") from None


def _refuse_paired(folder: Path, config: dict) -> None:
    """A contrastive decomposition's report needs its paired reference data, which no flag can
    give: refused before any model is loaded."""
    if config.get("reference") == "paired":
        raise UserError(f"{folder} is a contrastive decomposition (reference='paired'): its report needs the paired "
                        f"reference data, which the command line cannot pass; write it from Python with "
                        f"l3d_lens.report(dec, data, reference=...)")


def _note_unused_data_flags(args: argparse.Namespace, paths: list[str]) -> None:
    """A note on stderr for each of --seq-len, --text-column and --split given but unused by
    the data: .pt token ids keep their own rows, plain text files have no columns, only saved
    datasets have splits, and the embedded model's generated sequences use none of them."""
    used: set[str] = set()
    for p in paths:
        path = Path(p)
        if path.is_dir():
            used |= {"seq_len", "text_column", "split"}
        elif path.suffix.lower() in (".jsonl", ".json"):
            used |= {"seq_len", "text_column"}
        elif path.suffix.lower() != ".pt":
            used.add("seq_len")
    data = ", ".join(paths) if paths else "the embedded model's generated sequences"
    for name in ("seq_len", "text_column", "split"):
        if getattr(args, name, None) is not None and name not in used:
            print(f"l3d-lens: note: --{name.replace('_', '-')} {getattr(args, name)} is ignored: it does not "
                  f"apply to the data ({data})", file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    from .viz import report

    _threads(args)
    out = _report_path(args.out)
    _check_outputs([out], args.overwrite)
    model, dec, data = _load_saved(args)
    comparison = None
    if args.compare:
        comparison = _comparison(model, data, args)
    path = report(dec, data, out, comparison=comparison, to_str=to_str_for(model), progress=not args.quiet,
                  n_references=args.n_references, title=args.title)
    _record_outputs([out])  # the name checked before (``path``: where a symlink there points)
    print(f"report: {path}")
    return 0


def _comparison(model, data: torch.Tensor, args: argparse.Namespace):
    ok, why = _patching_available()
    if not ok:
        raise UserError(why)
    from .patching import compare_with_patching

    if _is_embedded(model):
        clean, corrupted, metric = induction_pairs(args.n_pairs, seed=getattr(args, "seed", 0) + 100)
    else:
        raise UserError(COMPARE_EMBEDDED_ONLY)
    return compare_with_patching(model, clean, corrupted, metric, direction="denoise", progress=not args.quiet)


def _compare(args: argparse.Namespace) -> int:
    _threads(args)
    out = _check_folder(Path(args.out)) if args.out else None
    tables = ("heads", "mlp", "neurons", "agreement")
    if out is not None:
        _check_outputs([out / f"{name}.csv" for name in tables], args.overwrite)
    if args.model not in EMBEDDED:  # before loading it
        raise UserError(COMPARE_EMBEDDED_ONLY)
    model = load_model(args.model, args.model_class, args.device)
    comparison = _comparison(model, None, args)
    print(comparison.summary())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name in tables:
            frame = getattr(comparison, name, None)
            if frame is not None:
                frame.to_csv(out / f"{name}.csv", index=False)
                _record_outputs([out / f"{name}.csv"])  # each as written: a failed write leaves the others rerunnable
        print(f"tables written to {out}")
    return 0


# --- parser --------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, quiet: bool = True) -> None:
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for small models)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace existing files at the output names even if l3d-lens did not write them (by "
                        f"default only its own unchanged earlier outputs, listed in {MANIFEST}, are replaced)")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bars")


def _model_args(p: argparse.ArgumentParser, default_class: Optional[str] = "auto") -> None:
    p.add_argument("--model-class", choices=("auto", "hooked", "bridge"), default=default_class,
                   help="HookedTransformer (TransformerLens 2/3) or TransformerBridge (3/4); auto: the bridge for "
                        "local directories and on TransformerLens 4, HookedTransformer for model names on 3")
    p.add_argument("--device", default=None, help="torch device for the model (default: where it loads)")


def _data_args(p: argparse.ArgumentParser, max_sequences: int, required_help: str, recorded: str = "") -> None:
    """The data flags; ``recorded``: how their defaults begin (report: the values recorded with
    the decomposition's data)."""
    p.add_argument("--data", nargs="+", default=[], metavar="PATH",
                   help=f"text files, .jsonl, .json (an array of texts), .pt token ids [n, seq] or Hugging Face "
                        f"datasets saved with save_to_disk; {required_help}")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per sequence for text data (default: {recorded}min(32, n_ctx))")
    p.add_argument("--max-sequences", type=_count, default=max_sequences,
                   help=f"use at most this many sequences (default {max_sequences})")
    p.add_argument("--text-column", default=None,
                   help=f"text field of .jsonl / .json / dataset rows (default: {recorded}text; a dataset without a "
                        f"text column may give an input_ids or tokens column instead)")
    p.add_argument("--split", default=None, help=f"dataset split (default: {recorded}train, else the first)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l3d-lens", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Local Loss Landscape Decomposition (L3D) for TransformerLens models: find the low-rank "
                    "parameter-space subnetworks (circuits) a model uses, and look at them.",
        epilog="examples:\n"
               "  l3d-lens demo                                  # embedded model, no download, ~1-2 min\n"
               "  l3d-lens decompose ./my-gpt2 --data corpus.txt --components blocks.0.attn --out dec/\n"
               "  l3d-lens report dec/ --out report.html         # model and data as recorded by decompose\n"
               "  l3d-lens compare induction                     # patching vs L3D on the embedded model\n"
               "user errors print one line and exit with status 2")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="decompose the embedded default model (no download), compare with activation "
                          "patching, write an HTML report and print a summary",
                          description="Decompose the embedded 2-layer induction model, compare with activation "
                                      "patching, write OUT/report.html and OUT/decomposition/.")
    demo.add_argument("--out", default="l3d_demo_out", help="output folder (default: l3d_demo_out)")
    demo.add_argument("--n-sequences", type=_count, default=512, help="number of training sequences (default 512)")
    demo.add_argument("--n-subnetworks", type=int, default=8, help="default 8")
    demo.add_argument("--epochs", type=int, default=10, help="default 10")
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--n-pairs", type=_count, default=32, help="(clean, corrupted) pairs for the patching comparison")
    demo.add_argument("--report-sequences", type=_count, default=128, help="held-out sequences in the report (default 128)")
    demo.add_argument("--no-compare", action="store_true", help="skip the activation-patching comparison")
    demo.add_argument("--no-report", action="store_true", help="skip the HTML report")
    _common(demo)
    demo.set_defaults(func=_demo)

    dec = sub.add_parser("decompose", help="decompose a model on your data and save the decomposition",
                         description="Decompose MODEL (a TransformerLens model name, a local Hugging Face model "
                                     "directory, or 'induction' for the embedded model) on --data and save the "
                                     "result to --out (safetensors + JSON). Settings come from --config (YAML/JSON "
                                     "with L3DConfig fields), then the flags below, then --set.")
    dec.add_argument("model", help="TransformerLens model name, local HF model directory, or 'induction'")
    dec.add_argument("--out", required=True, help="folder to save the decomposition in")
    _data_args(dec, 2048, "required except for the embedded model")
    dec.add_argument("--data-seed", type=_seed, default=0, help="seed of the embedded model's generated data")
    dec.add_argument("--config", help="YAML or JSON file of L3DConfig fields")
    g = dec.add_argument_group("L3D settings (override --config)")
    g.add_argument("--components", nargs="+", help="selectors: blocks.0.attn, 'blocks.*.mlp', blocks.1.attn.W_Q, "
                                                   "'blocks.0.attn[0,2]' (heads), 'blocks.0.mlp[0:64]' (neurons)")
    g.add_argument("--n-subnetworks", type=int)
    g.add_argument("--rank", type=_number, help="Tucker rank: an int, or a fraction in (0, 1) of each dimension of a weight as the model stores it")
    g.add_argument("--top-k", type=float, help="fraction of coefficients kept per batch (1.0 keeps all)")
    g.add_argument("--divergence", choices=("auto", "kl", "mse"))
    g.add_argument("--sample", choices=("auto", "token", "sequence"))
    g.add_argument("--position", type=_position, help="for --sample sequence: a position or 'all'")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--lr-decay", type=float)
    g.add_argument("--lr-step", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--engine", choices=("fast", "exact"))
    g.add_argument("--dtype", choices=("float32", "float64"))
    g.add_argument("--no-biases", action="store_true", help="leave biases out of the decomposition")
    g.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="any other L3DConfig field (VALUE parsed as JSON; True, False, None too), e.g. --set aux_coef=0.1; "
                        "repeatable")
    dec.add_argument("--report", metavar="HTML", help="also write the HTML report here")
    _model_args(dec)
    _common(dec)
    dec.set_defaults(func=_decompose)

    rep = sub.add_parser("report", help="write the HTML report of a saved decomposition",
                         description="Load a decomposition saved by 'decompose' or 'demo' with its model and data "
                                     "(by default those recorded when it was saved) and write one self-contained "
                                     "HTML file (works offline).")
    rep.add_argument("decomposition", help="folder of a saved decomposition")
    rep.add_argument("--out", default="l3d_report.html", help="HTML file to write (default l3d_report.html)")
    rep.add_argument("--model", help="model (default: the one recorded with the decomposition)")
    _data_args(rep, 128, "default: the data recorded with the decomposition",
               "the one recorded with the decomposition's data unless --data replaces it, else ")
    rep.add_argument("--n-references", type=_count, default=4, help="references averaged for impact (default 4)")
    rep.add_argument("--title", default=None)
    rep.add_argument("--compare", action="store_true", help="add the activation-patching comparison (embedded model)")
    rep.add_argument("--n-pairs", type=_count, default=32, help="pairs for --compare (default 32)")
    rep.add_argument("--no-check-weights", action="store_true",
                     help="load even if the model's weights differ from those decomposed")
    _model_args(rep, default_class=None)
    _common(rep)
    rep.set_defaults(func=_report)

    cmp_ = sub.add_parser("compare", help="activation patching vs attribution patching vs contrastive L3D",
                          description="Run l3d_lens.patching.compare_with_patching on (clean, corrupted) pairs. "
                                      "From the command line: the embedded model's induction task (clean repeated "
                                      "sequences vs a different first half); other models: use the Python API.")
    cmp_.add_argument("model", nargs="?", default="induction", help="'induction' (default)")
    cmp_.add_argument("--n-pairs", type=_count, default=32, help="(clean, corrupted) pairs (default 32)")
    cmp_.add_argument("--seed", type=_seed, default=0)
    cmp_.add_argument("--out", help="folder for heads.csv, agreement.csv, ...")
    _model_args(cmp_)
    _common(cmp_)
    cmp_.set_defaults(func=_compare)
    return parser


#: MemoryError: ``memory.check``'s refusal of a run that cannot fit (raised before training)
USER_ERRORS = (UserError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError, MemoryError)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"l3d-lens {args.command}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"l3d-lens {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
