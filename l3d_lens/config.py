"""L3DConfig: every setting of one decomposition, frozen and validated on construction.

The defaults take the paper's language-model choices of method (token samples, a random other
sample as reference, KL divergence, k = 0.1, rank a tenth of each dimension of a weight as the
model stores it) but a smaller, quicker run than its (20 subnetworks, 10 epochs and lr 0.01
with no decay within them; the paper: 100 subnetworks, 100 epochs, lr 0.005 decayed every 10).
Fields marked "auto" resolve against the model at ``decompose`` time (language model vs. plain
regression module).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import torch

from .checks import as_index, as_number, is_int, is_number

Rank = Union[int, float, Mapping[str, Union[int, float, Sequence[int]]]]

DIVERGENCES = ("auto", "kl", "mse")
SAMPLES = ("auto", "token", "sequence")
REFERENCES = ("random", "mean", "uniform", "zero", "paired")
ENGINES = ("fast", "exact")
LOSS_NORMS = ("batch", "sample")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
AUTOCASTS = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: the seeds a torch generator takes (``torch.Generator().manual_seed`` overflows outside them)
SEED_RANGE = (-2**63, 2**64 - 1)
#: the fields that hold a number (or None, or a string choice such as position='all')
NUMBER_FIELDS = ("n_subnetworks", "top_k", "position", "epochs", "batch_size", "lr", "lr_decay", "lr_step", "seed",
                 "aux_coef", "dead_steps", "aux_epochs", "resample_max", "loss_norm_epochs")


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


@dataclasses.dataclass(frozen=True)
class L3DConfig:
    """Settings of an L3D decomposition.

    components: TransformerLens-style selectors ("blocks.3.attn", "blocks.*.mlp",
        "blocks.1.attn.W_Q", "blocks.0.attn[0,2]" for heads, "blocks.0.mlp[0:64]" for
        neurons, "embed", "unembed"); for a plain nn.Module, parameter-name patterns.
    rank: Tucker rank per mode: an int (clipped to each mode's size), a fraction in (0, 1) of
        each dimension of the weight as the model stores it, rounded up (an attention weight's
        n_heads * d_head is one dimension: rank 0.1 of W_Q [n_heads, d_model, d_head] holds
        every d_model x n_heads*d_head matrix of rank min(ceil(0.1 d_model), ceil(0.1 n_heads
        d_head)), as the paper's 25 for 256; ``subnetworks.fraction_ranks``), or a dict weight-name (or "default") -> int | fraction | tuple
        per mode, kept as a read-only ``RankMap`` (the config is frozen and hashable).
    top_k: fraction of the batch's (sample, subnetwork) coefficients kept; 1.0 keeps all.
    sample: "token" (every sequence position is a sample, the paper's setting),
        "sequence" (one sample per sequence, the divergence at ``position``), or "auto".
    position: for sample="sequence": an int position or "all" (sum over positions).
    reference: "random" (another sample of the batch), "mean" (the batch mean; the paper's
        TMS and x² scripts), "uniform" (KL only), "zero" (MSE only: y_r = 0, so g = J^T f(x);
        the paper's TMCS and higher-rank scripts; see BENCHMARKS.md "Toy models"), or "paired"
        (reference data passed to ``decompose``: contrastive pairs).
    dtype: of the factors (and of the contractions); autocast: run the model's forward and
        backward under torch.autocast in "bf16" or "fp16" on the model's device (meant for GPUs;
        CPU autocast runs too), factors stay in ``dtype``.
    aux_coef: weight of an auxiliary loss that revives dead subnetworks (0: off, as in the
        paper): subnetworks outside every batch top-k for ``dead_steps`` steps are trained to
        reconstruct the residual g - g_hat with their own top-k coefficients (AuxK, as for
        top-k sparse autoencoders). aux_epochs: apply it in the first ``aux_epochs`` epochs
        only (None: all), so that subnetworks revived early but not needed die again.
    resample_epochs: epochs (each in 1..epochs-1) at whose start every dead subnetwork (outside
        every batch top-k for ``dead_steps`` steps) is re-initialised toward what the live ones
        fail to reconstruct: the residual g - g_hat of a high-error sample of that epoch's first
        batch, its Adam moments zeroed (resampling, as for sparse autoencoders; Adam's step count,
        one per factor tensor, runs on, so its first updates are a few times lr). Resampling only
        early in training lets the ones that are not needed die again. () turns it off. On the
        higher-rank toy model one resampling of at most one, at 1/12 of training, gives one live
        subnetwork per group and the rest dead in 10 of 10 seeds (BENCHMARKS.md, "Toy models:
        resampling").
        resample_max: at most this many dead subnetworks per resampling (lowest index first);
        None: all of them.
    loss_norm: "batch" (the paper's sum_i ||g_i - g_hat_i||^2 / sum_i ||g_i||^2: samples with
        large gradients weigh most) or "sample" (mean_i ||g_i - g_hat_i||^2 / ||g_i||^2 over the
        samples with a non-zero gradient: every sample weighs the same). On TMCS "sample" keeps
        rows with several active features, and their cross terms, from tilting the subnetworks
        (BENCHMARKS.md, "Toy models: per-sample loss"). ``reconstruction_error`` is the batch
        form either way.
        loss_norm_epochs: with loss_norm="sample", use it in the first ``loss_norm_epochs``
        epochs only and the batch form after (None: all epochs). On TMCS, 150 of 300 epochs
        per-sample keep one run out of the poor optima the batch loss can end in, and it ends
        at the batch loss's error: in 10 of 10 seeds as close to the features' own gradients
        as the best of 3 batch runs, for one run's time. On x² it is no substitute for the
        best of 3 (BENCHMARKS.md, "Toy models: per-sample, then batch"). A later switch is
        no compromise between the two losses: from 150 to 285 of 300 epochs, TMCS runs end
        at the same statistic and error ("Toy models: when to switch").
    """

    components: Union[str, Sequence[str]]
    n_subnetworks: int = 20
    rank: Rank = 0.1
    top_k: float = 0.1
    divergence: Union[str, Callable[..., torch.Tensor]] = "auto"
    sample: str = "auto"
    position: Union[int, str] = -1
    reference: str = "random"
    include_biases: bool = True
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    lr_decay: float = 0.8
    lr_step: int = 10
    seed: int = 0
    device: Union[str, None] = None
    dtype: str = "float32"
    engine: str = "fast"
    autocast: Union[str, None] = None
    aux_coef: float = 0.0
    dead_steps: int = 20
    aux_epochs: Union[int, None] = None
    resample_epochs: tuple[int, ...] = ()
    resample_max: Union[int, None] = None
    loss_norm: str = "batch"
    loss_norm_epochs: Union[int, None] = None

    def __post_init__(self) -> None:
        given = self.components
        if isinstance(given, (set, frozenset)):  # its order changes between processes (PYTHONHASHSEED)
            raise ValueError(f"components must be a list or tuple, not a set: their order is saved with the "
                             f"decomposition and compared on resuming, and a set's changes between processes; "
                             f"got {given!r}")
        comps = (given,) if isinstance(given, str) else tuple(given) if isinstance(given, Iterable) else ()
        if not comps or not all(isinstance(c, str) and c.strip() for c in comps):
            raise ValueError(
                "components must be a non-empty selector or list of selectors, e.g. "
                f"'blocks.0.attn', ['blocks.*.mlp', 'blocks.1.attn.W_Q'], 'blocks.0.attn[0,2]'; got {given!r}"
            )
        object.__setattr__(self, "components", comps)
        for name in NUMBER_FIELDS:
            object.__setattr__(self, name, plain_number(getattr(self, name)))
        object.__setattr__(self, "rank", _plain_rank(self.rank))
        if isinstance(self.resample_epochs, (list, tuple)):
            object.__setattr__(self, "resample_epochs", tuple(plain_number(e) for e in self.resample_epochs))
        if isinstance(self.device, torch.device):  # kept as its string: the config is saved as JSON
            object.__setattr__(self, "device", str(self.device))
        if isinstance(self.dtype, torch.dtype):
            inverse = {v: k for k, v in DTYPES.items()}
            _choice("dtype", self.dtype, list(DTYPES.values()))
            object.__setattr__(self, "dtype", inverse[self.dtype])
        self._validate()

    def _validate(self) -> None:
        if not is_int(self.n_subnetworks) or self.n_subnetworks < 1:
            raise ValueError(f"n_subnetworks must be an int >= 1, got {self.n_subnetworks!r}")
        if not is_number(self.top_k) or not 0 < self.top_k <= 1:
            raise ValueError(f"top_k must be a fraction in (0, 1] (1.0 keeps every coefficient), got {self.top_k!r}")
        _check_rank(self.rank)
        if not callable(self.divergence):
            _choice("divergence", self.divergence, DIVERGENCES + ("<a callable (output, reference) -> per-sample tensor>",))
        _choice("sample", self.sample, SAMPLES)
        if not is_int(self.position) and self.position != "all":
            raise ValueError(f"position must be an int (e.g. -1 for the last token) or 'all', got {self.position!r}")
        _choice("reference", self.reference, REFERENCES)
        _check_device(self.device)
        if not isinstance(self.include_biases, bool):  # a string such as "False" would count as true
            raise ValueError(f"include_biases must be True or False, got {self.include_biases!r}")
        for ref, needs in (("uniform", "kl"), ("zero", "mse")):
            if self.reference == ref and isinstance(self.divergence, str) and self.divergence not in ("auto", needs):
                raise ValueError(f"reference={ref!r} needs divergence={needs!r}, got divergence={self.divergence!r}")
        _choice("engine", self.engine, ENGINES)
        _choice("loss_norm", self.loss_norm, LOSS_NORMS)
        if self.loss_norm_epochs is not None:
            if not is_int(self.loss_norm_epochs) or self.loss_norm_epochs < 1:
                raise ValueError(f"loss_norm_epochs must be None (all epochs) or an int >= 1, "
                                 f"got {self.loss_norm_epochs!r}")
            if self.loss_norm == "batch":
                raise ValueError("loss_norm_epochs switches from loss_norm='sample' to the batch form; "
                                 "with loss_norm='batch' there is nothing to switch, leave it None")
            _check_within_epochs("loss_norm_epochs", self.loss_norm_epochs, self.epochs, "the per-sample loss")
        _choice("dtype", self.dtype, tuple(DTYPES))
        _choice("autocast", self.autocast, (None, *AUTOCASTS))
        if self.autocast is not None and self.engine != "fast":
            raise ValueError("autocast applies to the model's forward/backward in engine='fast'; use engine='fast'")
        for name in ("epochs", "batch_size", "lr_step"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not is_number(self.lr) or not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not is_number(self.lr_decay) or not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay!r}")
        if not is_number(self.aux_coef) or not 0 <= self.aux_coef < math.inf:
            raise ValueError(f"aux_coef must be a finite number >= 0 (0 turns the dead-subnetwork loss off), got {self.aux_coef!r}")
        if not is_int(self.dead_steps) or self.dead_steps < 1:
            raise ValueError(f"dead_steps must be an int >= 1, got {self.dead_steps!r}")
        if self.aux_epochs is not None:
            if not is_int(self.aux_epochs) or self.aux_epochs < 1:
                raise ValueError(f"aux_epochs must be None (all epochs) or an int >= 1, got {self.aux_epochs!r}")
            if self.aux_coef == 0:
                warnings.warn(f"aux_epochs={self.aux_epochs} limits the auxiliary loss to its first epochs, but "
                              f"aux_coef=0 turns that loss off, so it changes nothing; set aux_coef > 0 or leave "
                              f"aux_epochs None", stacklevel=4)
            _check_within_epochs("aux_epochs", self.aux_epochs, self.epochs, "the auxiliary loss")
        _check_resample_epochs(self.resample_epochs, self.epochs)
        if self.resample_max is not None and (not is_int(self.resample_max) or self.resample_max < 1):
            raise ValueError(f"resample_max must be None (every dead subnetwork) or an int >= 1, "
                             f"got {self.resample_max!r}")
        if not is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be an int in -2**63 .. 2**64 - 1 (the seeds a torch generator takes), "
                             f"got {self.seed!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def replace(self, **changes: Any) -> "L3DConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; a callable divergence is stored by its qualified name, or a partial or
        callable object (which has none) by its repr less any memory address (" at 0x..."), which
        would differ in every process, so that a checkpoint of it never resumed; an object whose
        repr is the default one also by a digest of its attributes, so that two instances of one
        class with other settings are not one run."""
        d = dataclasses.asdict(self)
        d["components"] = list(self.components)
        if callable(self.divergence):
            name = getattr(self.divergence, "__qualname__", None)
            d["divergence"] = "callable:" + (name or without_address(repr(self.divergence))
                                             + _settings(self.divergence))
        if isinstance(self.rank, Mapping):
            d["rank"] = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in self.rank.items()}
        d["resample_epochs"] = list(self.resample_epochs)
        return d

    @classmethod
    def with_defaults(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        """``d`` (a ``to_dict`` of this or an earlier l3d_lens) with every field it lacks set to
        its default, in ``to_dict`` form: a config saved before a field existed ran as if it had
        the default, so the two compare equal."""
        out = dict(d)
        for f in dataclasses.fields(cls):
            if f.name not in out and f.default is not dataclasses.MISSING:
                out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], divergence: Union[Callable, None] = None) -> "L3DConfig":
        """The config ``to_dict`` gave; ``divergence``: the callable a saved "callable:<name>" stands
        for, the same function again (a function's qualified name must be <name>; a partial or
        callable object, saved by its repr with or without a memory address, is not compared), and
        only for such a save."""
        d = dict(d)
        saved = d.get("divergence")
        if isinstance(saved, str) and saved.startswith("callable:"):
            name = saved[len("callable:"):]
            if divergence is None:
                raise ValueError(f"this decomposition used a custom divergence ({name}); pass it again as divergence=")
            if not callable(divergence):
                raise TypeError(f"divergence= must be the callable this decomposition used ({name}), "
                                f"got {divergence!r}")
            given = getattr(divergence, "__qualname__", None)  # a partial or callable object has none: not compared
            if given is not None and given != name:
                raise ValueError(f"this decomposition used the custom divergence {name}, but divergence= is {given}; "
                                 f"pass the same function (its qualified name is compared)")
            d["divergence"] = divergence
        elif divergence is not None:
            raise ValueError(f"this decomposition used the built-in divergence {saved!r}, which loads by itself; "
                             f"divergence= is only for one computed with a custom callable: leave it out")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; valid fields: {sorted(known)}")
        return cls(**d)


class RankMap(dict):
    """A per-weight rank as a config keeps it: a dict (JSON, ``|`` and ``isinstance(r, dict)``
    work as on the one given) that is read-only (``cfg.rank["default"] = -5`` would bypass
    validation; ``copy()`` gives a plain one to edit) and hashable, as a frozen config is."""

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a config's rank is read-only: make another config with cfg.replace(rank=...) (cfg.rank.copy() "
                        "gives a dict to edit)")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def copy(self) -> dict:  # type: ignore[override]
        return dict(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return RankMap, (dict(self),)


def plain_number(value: Any) -> Any:
    """A numpy scalar or 0-d tensor as the Python int (integer dtypes) or float it holds, and an
    int or float subclass as the plain one, so that configs of equal values are equal, hash and
    save alike; anything else (a bool, None, a string, an array) as it is, for validation to judge."""
    if value is None or isinstance(value, (bool, str)) or getattr(value, "ndim", 0) != 0:
        return value
    if type(value) in (int, float):
        return value
    index = as_index(value)
    if index is not None:
        return index
    number = as_number(value)
    return value if number is None else number


def _plain_rank(rank: Any) -> Any:
    """``rank`` with its numbers plain (``plain_number``); a per-weight mapping as a ``RankMap``
    of them, a per-mode list (as JSON gives it back) as a tuple."""
    if not isinstance(rank, Mapping):
        return plain_number(rank)
    return RankMap({k: tuple(plain_number(x) for x in v) if isinstance(v, (list, tuple)) else plain_number(v)
                    for k, v in rank.items()})


def without_address(text: str) -> str:
    """``text`` without the memory addresses (" at 0x...") a repr holds, which differ between
    processes: a callable by its name, not where it lies."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def _settings(obj: object) -> str:
    """" settings <digest>" of a callable object's attributes where its repr is the default one
    (which shows none of them), else "": ScaledMSE(1) and ScaledMSE(1000) differ."""
    if type(obj).__repr__ is not object.__repr__ or not hasattr(obj, "__dict__"):
        return ""
    text = repr(sorted(vars(obj).items(), key=lambda kv: kv[0]))
    return " settings " + hashlib.sha256(without_address(text).encode()).hexdigest()[:16]


def _check_device(device: object) -> None:
    """None (the model's device) or a device string torch can parse. Whether this machine has
    it is checked when a run starts (``decomposition.check_run``): a config may be saved on one
    machine and loaded on another."""
    if device is None:
        return
    if not isinstance(device, str):
        raise ValueError(f"device must be None (the model's device) or a string such as 'cpu', 'cuda', 'cuda:1', "
                         f"got {device!r}")
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"device={device!r} is not a device torch knows ({str(e).splitlines()[0]}); e.g. 'cpu', "
                         f"'cuda', 'cuda:1', or None for the model's device") from None


def autocast_context(autocast: Union[str, None], device: torch.device):
    """The context a model's forward runs in for ``cfg.autocast``: torch.autocast in its half
    dtype on ``device``, or nothing when it is None (factors stay in ``cfg.dtype`` either way)."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCASTS[autocast])


def _check_resample_epochs(epochs_list: Any, epochs: int) -> None:
    """Resampling happens at the start of an epoch after the first (before it nothing can be
    dead) and before the end of training, each epoch once."""
    valid = (isinstance(epochs_list, tuple)
             and all(is_int(e) and 1 <= e < epochs for e in epochs_list)
             and list(epochs_list) == sorted(set(epochs_list)))
    if not valid:
        span = f"1..{epochs - 1}" if epochs > 1 else "none: epochs=1 leaves no epoch to resample at"
        raise ValueError(f"resample_epochs must be a tuple of increasing, distinct epochs in {span} "
                         f"(e.g. (25, 50, 75)), or () for no resampling; got {epochs_list!r}")


def _check_within_epochs(name: str, value: int, epochs: int, what: str) -> None:
    """An epoch limit beyond the run's end changes nothing: a warning names it (not an error: a
    sweep over epochs, or a saved run, may hold one)."""
    if value > epochs:
        warnings.warn(f"{name}={value} is beyond the run's epochs={epochs}: {what} applies in every epoch, as "
                      f"{name}=None does", stacklevel=5)


def _check_rank(rank: Rank) -> None:
    def one(r: Any, where: str) -> None:
        if isinstance(r, bool):
            raise ValueError(f"rank{where} must be an int >= 1, a fraction in (0, 1) or a tuple per mode, got {r!r}")
        if isinstance(r, int):
            if r < 1:
                raise ValueError(f"rank{where} must be >= 1, got {r}")
        elif isinstance(r, float):
            if not 0 < r < 1:
                raise ValueError(f"rank{where} as a fraction must be in (0, 1), got {r}; use an int for absolute ranks")
        elif isinstance(r, (list, tuple)) and where:
            if not r or not all(is_int(x) and x >= 1 for x in r):
                raise ValueError(f"rank{where} as a tuple must list one int >= 1 per mode, got {r!r}")
        else:
            raise ValueError(f"rank{where} must be an int >= 1, a fraction in (0, 1) or (per weight) a tuple, got {r!r}")

    if isinstance(rank, Mapping):
        if not rank:
            raise ValueError("rank as a dict must name at least one weight (use 'default' for the rest)")
        for k, v in rank.items():
            if not isinstance(k, str):  # JSON would give it back as a string, another config
                raise ValueError(f"rank as a dict is keyed by weight names (strings, e.g. 'blocks.0.attn.W_Q') or "
                                 f"'default' for the rest, got the key {k!r}")
            one(v, f"[{k!r}]")
    else:
        one(rank, "")
