"""Input data: validation (before any expensive work) and batching.

Data is a tensor (token ids [n, seq] for a language model, floats [n, ...] for a plain
module) or a re-iterable of such batches; with ``reference='paired'``, a tensor of the same
shape (or batches of (data, reference) pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Optional, TypeVar, Union

import torch

from .adapters import Adapter
from .config import autocast_context

Data = Union[torch.Tensor, Iterable]
T = TypeVar("T")


def check_batch(adapter: Adapter, x: object, what: str = "data") -> torch.Tensor:
    """``x`` checked as a batch for the model: token ids [n, seq] for a language model, as an
    int64 tensor (of any integer dtype, signed or not, as a nanoGPT-style uint16 memmap; a copy
    where ``x`` has another: never ``x`` changed in place), else float samples [n, ...] as given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor (or an iterable of tensors), got {type(x).__name__}")
    if x.numel() == 0 or x.shape[0] == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)})")
    if adapter.is_language_model:
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{what} must hold token ids (an integer tensor [n, seq]), got dtype {x.dtype}; "
                            f"tokenize text first, unpadded: model.to_tokens(text) for one text, "
                            f"l3d_lens.streaming.TokenStream to pack many (to_tokens pads a list of texts, and the "
                            f"padding would be decomposed)")
        if x.dim() != 2:
            raise ValueError(f"{what} must be token ids of shape [n, seq], got shape {tuple(x.shape)}")
        if adapter.n_ctx is not None and x.shape[1] > adapter.n_ctx:
            raise ValueError(f"{what} has sequences of length {x.shape[1]}, longer than the model's n_ctx={adapter.n_ctx}")
        ids = x.long()  # before min/max: torch has none for uint16/32/64
        if adapter.d_vocab is not None and (ids.min() < 0 or ids.max() >= adapter.d_vocab):
            raise ValueError(f"{what} holds token ids outside [0, {adapter.d_vocab}) (d_vocab of the model)")
        return ids
    if not x.is_floating_point():
        raise TypeError(f"{what} for a non-language model must be a float tensor [n, ...], got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{what} must have a sample axis and a feature axis [n, d], got shape {tuple(x.shape)}")
    return x


def check_data(adapter: Adapter, data: Data, reference: Optional[Data], paired_mode: bool) -> None:
    """Validate data (and reference data) up front; for iterables, the first batch."""
    if paired_mode and reference is None and isinstance(data, torch.Tensor):
        raise ValueError("reference='paired' needs reference data: pass reference=<tensor like data> (to decompose, "
                         "and to a contrastive decomposition's coefficients, impact, top_samples, ...)")
    if reference is not None and not paired_mode:
        raise ValueError("reference data was given but cfg.reference is not 'paired'; set reference='paired'")
    if isinstance(data, torch.Tensor):
        check_batch(adapter, data)
        if reference is not None:
            check_pair(data, check_batch(adapter, reference, "reference"))
        return
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"data must be a tensor or an iterable of tensor batches, got {type(data).__name__}")
    if iter(data) is data:
        raise TypeError("data is a one-shot iterator; pass a list or another re-iterable of batches (training makes "
                        "several passes)")
    first = next(iter(data), None)
    if first is None:
        raise ValueError("data is empty (the iterable yields no batch)")
    if paired_mode:
        if not (isinstance(first, (tuple, list)) and len(first) == 2):
            raise TypeError("with reference='paired', an iterable must yield (data, reference) pairs")
        check_pair(check_batch(adapter, first[0]), check_batch(adapter, first[1], "reference"), 0)
    else:
        check_batch(adapter, first)


def check_pair(x: torch.Tensor, ref: torch.Tensor, i: Optional[int] = None) -> None:
    """ValueError unless the (data, reference) pair (batch ``i`` of an iterable; None: tensors)
    has one shape: each sample is compared with its reference sample (token mode: position by
    position), so a reference of other rows or sequence length would pair samples with unrelated
    ones, or drop some."""
    if ref.shape != x.shape:
        where = "" if i is None else f"batch {i} of the data: "
        raise ValueError(f"{where}reference has shape {tuple(ref.shape)}, data has {tuple(x.shape)}; they must match")


def first_batch(data: Data) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(inputs, paired reference or None) of the data's first batch: the tensor itself, or an
    iterable's first item (a (data, reference) pair or a batch)."""
    first = data if isinstance(data, torch.Tensor) else next(iter(data))
    return (first[0], first[1]) if isinstance(first, (tuple, list)) else (first, None)


def check_position(adapter: Adapter, data: Data, position: Union[int, str]) -> None:
    """An int ``position`` (sample='sequence') must lie in the sequences of ``data``, counted from
    either end as Python indexes: a tensor's, those of every batch of a list or tuple (they are
    in memory), the first batch of another iterable (``batches``, given the position, checks
    each of its batches as it reads them). A paired batch's reference is checked too."""
    if not adapter.is_language_model or position == "all":
        return
    if isinstance(data, torch.Tensor):
        _check_in(position, data.shape[1], "")
        return
    items = data if isinstance(data, (list, tuple)) else [first_batch(data)]
    seqs = [(x.shape[1], i) for i, item in enumerate(items)
            for x in (item if isinstance(item, (tuple, list)) else (item,))
            if isinstance(x, torch.Tensor) and x.dim() >= 2]  # batches() refuses other batches by their type
    if seqs:  # the shortest sequences: a position in range for them is in range for every batch
        seq, i = min(seqs)
        _check_in(position, seq, f" (batch {i} of the data)")


def _check_in(position: int, seq: int, where: str) -> None:
    """ValueError unless ``position`` indexes a sequence of ``seq`` tokens; ``where`` names the batch."""
    if not -seq <= position < seq:
        raise ValueError(f"position={position} is outside the sequences of length {seq}{where}; choose one of "
                         f"{-seq}..{seq - 1} (-1: the last token) or 'all'")


def run_row(adapter: Adapter, x: torch.Tensor, autocast: Optional[str] = None) -> None:
    """The first row of ``x`` through the model on its device, without grad, in eval mode and
    under ``autocast`` as training runs it: raises what that forward raises."""
    with torch.no_grad(), adapter.session(), autocast_context(autocast, adapter.device):
        adapter.forward(x[:1].to(adapter.device))


def check_dtype(adapter: Adapter, data: Data, reference: Optional[Data] = None,
                autocast: Optional[str] = None) -> None:
    """TypeError naming the dtypes when float data (or paired reference data) of another dtype
    than the model's parameters does not run through the model: one no-grad row in eval mode,
    under ``autocast`` as training runs it. A float64 batch for a float32 model would fail
    inside F.linear at the first step; a model that casts its input, or float32 data under
    autocast, passes. Iterables are checked on their first batch; ``batches`` refuses a later
    batch whose dtype or sample shape differs from the first's."""
    if adapter.is_language_model:
        return
    inputs, paired = first_batch(data)
    given = [("data", inputs)] + [("reference", r) for r in (paired, reference) if isinstance(r, torch.Tensor)]
    for what, x in given:
        if x.dtype == adapter.model_dtype:
            continue
        try:
            run_row(adapter, x, autocast)
        except RuntimeError as e:
            under = f" (under {autocast} autocast)" if autocast else ""
            raise TypeError(f"{what} is {x.dtype} but the model's parameters are {adapter.model_dtype}{under}, and the "
                            f"model does not take it ({e}); pass {what}.to({adapter.model_dtype})") from None


def batch_starts(n: int, batch_size: int, min_batch: int = 1) -> list[int]:
    """First row of each batch of n rows, cut ``max(batch_size, min_batch)`` rows long; a last
    batch smaller than ``min_batch`` joins the one before."""
    starts = list(range(0, n, max(batch_size, min_batch)))
    if len(starts) > 1 and n - starts[-1] < min_batch:
        starts.pop()
    return starts


def gather(items: Iterable[T], rows: Callable[[T], int], join: Callable[[T, T], T],
           min_batch: int) -> Iterator[T]:
    """The batching rule for batches read as they come: ``items`` shorter than ``min_batch`` rows
    ``join`` the next until they have that many, and a short tail joins the batch before (one
    batch is held back to allow it); too few rows in all is a ValueError. ``batches`` batches an
    iterable by it, and the count of a list's batches is taken by it, so the two cannot part."""
    ready = short = None
    for item in items:
        short = item if short is None else join(short, item)
        if rows(short) >= min_batch:
            if ready is not None:
                yield ready
            ready, short = short, None
    if short is not None:
        if ready is None:  # nothing to join
            raise _too_few(rows(short), min_batch)
        ready = join(ready, short)
    if ready is not None:
        yield ready


def batches(adapter: Adapter, data: Data, reference: Optional[Data], batch_size: int,
            order: Optional[torch.Tensor] = None, min_batch: int = 1, skip: int = 0, *,
            position: Union[int, str] = "all") -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(inputs, paired reference or None) per batch, skipping the first ``skip`` batches (a
    resumed checkpoint's; data with fewer batches than that is not the checkpointed run's: a
    ValueError). Tensors are taken in ``order`` (default: as stored); a last batch smaller than
    ``min_batch`` joins the one before, and no batch is cut smaller than ``min_batch``. Iterables
    are read as they come, each batch checked against ``position`` as ``check_position`` checks
    the first; their batches smaller than ``min_batch`` gather with the next until they have
    that many rows, and a short last one joins the batch before (one batch is held back to
    allow it). Batches come detached from any autograd graph of the user's (float data that
    requires grad): training must backpropagate into the factors only."""
    if isinstance(data, torch.Tensor):
        n = data.shape[0]
        if n < min_batch:
            raise _too_few(n, min_batch)
        order = torch.arange(n) if order is None else order
        starts = batch_starts(n, batch_size, min_batch)
        if skip > len(starts):
            raise _resume_error(len(starts), skip)
        for i, a in enumerate(starts):
            if i < skip:
                continue
            b = starts[i + 1] if i + 1 < len(starts) else n
            idx = order[a:b]
            x = check_batch(adapter, data[idx]).detach()
            yield x, (check_batch(adapter, reference[idx], "reference").detach() if reference is not None else None)
        return
    first: list[torch.Tensor] = []

    def read(i: int, item) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if reference is None and isinstance(item, (tuple, list)) and len(item) == 2:
            x, ref = check_batch(adapter, item[0]).detach(), check_batch(adapter, item[1], "reference").detach()
            check_pair(x, ref, i)
        else:
            x, ref = check_batch(adapter, item).detach(), None
        if not first:
            first.append(x)
        elif not adapter.is_language_model and (x.dtype, x.shape[1:]) != (first[0].dtype, first[0].shape[1:]):
            raise ValueError(f"batch {i} of the data is {x.dtype} of shape {tuple(x.shape)}, unlike the first batch "
                             f"({first[0].dtype}, shape {tuple(first[0].shape)}); every batch needs the first's "
                             f"dtype and sample shape")
        if adapter.is_language_model and position != "all":
            for t in (x, ref) if ref is not None else (x,):
                _check_in(position, t.shape[1], f" (batch {i} of the data)")
        return x, ref

    def joined(i: int, a, b):
        """Batch ``a`` then ``b`` as one (at least one of them is short)."""
        if a[0].shape[1:] != b[0].shape[1:]:
            raise ValueError(f"batch {i} of the data ({b[0].shape[0]} rows) and the batch before ({a[0].shape[0]}) "
                             f"must join, as one has fewer than the {min_batch} rows a batch needs, but their shapes "
                             f"differ: {tuple(b[0].shape)} and {tuple(a[0].shape)}; give every batch at least "
                             f"{min_batch} rows")
        return torch.cat([a[0], b[0]]), None if b[1] is None else torch.cat([a[1], b[1]])

    def merged():
        # short batches gather until they reach min_batch (so a stream of short batches stays
        # short batches, not one batch of everything); a short tail joins the last full batch
        def join(a, b):
            return b[0], joined(b[0], a[1], b[1])
        items = ((i, read(i, item)) for i, item in enumerate(data))
        for _, batch in gather(items, lambda item: item[1][0].shape[0], join, min_batch):
            yield batch

    n_read = 0
    for n_read, batch in enumerate(merged(), 1):
        if n_read > skip:
            yield batch
    if n_read < skip:
        raise _resume_error(n_read, skip)


def _too_few(n: int, min_batch: int) -> ValueError:
    """Data of fewer rows than a batch needs: against a random reference a lone sample has no
    other to draw, against the batch mean it is its own reference (every gradient zero), and a
    distributed run shares each batch out a row per rank."""
    return ValueError(f"the data has {n} row(s), fewer than the {min_batch} a batch needs (against a random or mean "
                      f"reference a lone sample has no other to draw and is its own mean, every gradient zero; a "
                      f"distributed run needs a row per rank); pass at least {min_batch} samples (to decompose: or "
                      f"choose reference='uniform' (KL), 'zero' (MSE) or 'paired')")


def _resume_error(n: int, skip: int) -> ValueError:
    return ValueError(f"the data has only {n} batches but the checkpoint resumes after batch {skip}: the data differs "
                      f"from the checkpointed run's; pass that data again or use a fresh checkpoint folder")
