"""The adapter interface: one view of a model's decomposable weights, whatever its class.

An adapter names every weight the way TransformerLens does (``blocks.1.attn.W_Q``, shape
[n_heads, d_model, d_head]) and knows, for each, how to read it, how to substitute it in a
functional forward pass (exact engine), and which activations carry its input and its
output (fast engine). It never copies or re-wraps the user's model, and every hook it adds
is removed before it returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Mapping
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules import module as torch_module

TOKENS = "<tokens>"
POSITIONS = "<positions>"


@dataclasses.dataclass(frozen=True)
class Site:
    """One decomposable weight and how it is used: ``out = in (x) W`` summed over positions.

    ``modes`` name the axes of the TransformerLens-shaped tensor. The per-sample gradient is
    sum over positions of the product of the input activation (axes ``in_modes``) and the
    output gradient (axes ``out_modes``); a mode in both is elementwise (LayerNorm scale).
    ``input`` / ``output`` are capture-point keys (``TOKENS`` / ``POSITIONS`` mean a one-hot
    of the token ids or of the positions; ``input=None`` for a bias).
    """

    name: str
    kind: str
    layer: Optional[int]
    modes: tuple[str, ...]
    shape: tuple[int, ...]
    in_modes: tuple[str, ...] = ()
    out_modes: tuple[str, ...] = ()
    input: Optional[str] = None
    output: Optional[str] = None

    @property
    def fast(self) -> bool:
        return self.output is not None

    @property
    def is_bias(self) -> bool:
        return self.input is None and self.output is not None


#: the segments a TransformerBridge adds around the modules it wraps
WRAPPERS = frozenset({"_original_component", "original_component"})
#: why a parameter outside TransformerLens's standard weights is left out
NO_SITE = ("l3d_lens has no decomposition site for these (it decomposes W_E, W_pos, W_Q/K/V/O, W_in/W_gate/W_out, "
           "W_U, their biases and the ln1/ln2/ln_final scales and biases; not QK-norm or post-norm scales, an "
           "MLP's own LayerNorm or MoE experts)")
#: the names of the buffers that hold weights (a module then has no Parameter of that name), not
#: values computed from the config such as rotary caches or attention masks
WEIGHT_BUFFERS = frozenset({"weight", "bias"})
#: why a weight kept in a buffer is left out
IN_BUFFER = ("a buffer, not an nn.Parameter (as a TransformerLens 4 bridge in compatibility mode keeps the folded "
             "unembedding bias): l3d_lens decomposes parameters only; loading a saved decomposition checks its value")


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def zero_bias(name: str, t: torch.Tensor) -> bool:
    """A buffer named ``bias`` that holds zeros: it counts as none (a TransformerLens 4 bridge adds
    one where the checkpoint has no bias)."""
    return name.rpartition(".")[2] == "bias" and not t.is_meta and not t.any()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the duration, then every module's own mode restored (a mixed state
    too), even if the body raises."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def gqa_reason(n_kv_heads: int, n_heads: int) -> str:
    """Why grouped-query attention's K and V are not decomposed."""
    return (f"grouped-query attention: {n_kv_heads} key/value heads shared by {n_heads} query heads "
            f"(l3d_lens decomposes Q, O and the MLPs of such models, not K and V)")


def span(t: torch.Tensor) -> tuple[str, int, int]:
    """The memory a tensor's elements lie in: device, first byte, one past the last."""
    start = t.data_ptr()
    if t.numel() == 0:
        return str(t.device), start, start
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return str(t.device), start, start + (last + 1) * t.element_size()


def merged(spans: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Overlapping or touching spans of one device joined."""
    out: list[tuple[str, int, int]] = []
    for device, a, b in sorted(spans):
        if out and out[-1][0] == device and a <= out[-1][2]:
            out[-1] = (device, out[-1][1], max(out[-1][2], b))
        else:
            out.append((device, a, b))
    return out


def overlap(p: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether ``p`` and ``q`` share a byte of memory (a weight tied by ``nn.Parameter(w.data.T)``,
    or one of them a view of the other). Spans that overlap are checked element by element on
    a mask of their bytes, so interleaved views (a fused qkv's columns) count as disjoint;
    elements of different sizes that meet count as shared."""
    if p.is_meta or q.is_meta or p.numel() == 0 or q.numel() == 0:
        return False
    (dp, a, b), (dq, c, d) = span(p), span(q)
    if dp != dq or b <= c or d <= a:
        return False
    size = p.element_size()
    if q.element_size() != size or (c - a) % size:
        return True
    start = min(a, c)
    mask = torch.zeros((max(b, d) - start) // size, dtype=torch.bool)
    mask.as_strided(p.shape, p.stride(), (a - start) // size).fill_(True)
    return bool(mask.as_strided(q.shape, q.stride(), (c - start) // size).any())


def inside(p: torch.Tensor, spans: list[tuple[str, int, int]]) -> bool:
    """Whether every byte of ``p`` lies in the sites' parameters (a fused weight they are views of)."""
    if p.is_meta or p.numel() == 0:
        return False
    device, a, b = span(p)
    return any(d == device and lo <= a and b <= hi for d, lo, hi in spans)


class Adapter:
    """Base class: a model plus its sites. Subclasses fill ``sites`` and the native maps."""

    kind: str = "module"
    is_language_model: bool = False
    head_point: Optional[str] = None  # capture key of the unembedding's input (token-mode backward)
    logits_point: Optional[str] = None  # capture key of the logits

    def __init__(self, model: nn.Module):
        self.model = model
        self.sites: dict[str, Site] = {}
        self._param_path: dict[str, str] = {}
        self._to_native: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._from_native: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._capture: dict[str, tuple[nn.Module, str]] = {}
        self.unsupported: dict[str, str] = {}  # weights the model has but no site exposes -> why
        # TransformerLens names of weights the model keeps in a buffer (no site) -> (buffer path, native -> TL)
        self._in_buffers: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
        # ids of parameters with no fingerprint of their own: a bridge's fused qkv, split into q, k and v (a copy
        # the forward never reads, as in compatibility mode, or the source of their views, which cover it)
        self.unread: set[int] = set()

    # --- description -------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return 0

    @property
    def n_heads(self) -> int:
        return 0

    @property
    def d_mlp(self) -> int:
        return 0

    @property
    def n_ctx(self) -> Optional[int]:
        return None

    @property
    def d_vocab(self) -> Optional[int]:
        return None

    @property
    def device(self) -> torch.device:
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def model_dtype(self) -> torch.dtype:
        p = next(iter(self.model.parameters()), None)
        return p.dtype if p is not None else torch.float32

    # --- weights -----------------------------------------------------------------------
    def native_parameter(self, name: str) -> nn.Parameter:
        return self.model.get_parameter(self._param_path[name])

    def _parameter_slots(self) -> dict[tuple[int, str], tuple[str, nn.Parameter]]:
        """{(id(module), attribute): (path, Parameter)} for every module attribute holding a
        Parameter, once each: a module reached by two paths (TL 4 bridges wrap theirs) counts
        once, a Parameter tied into two modules twice."""
        return {(id(module), attr): (f"{path}.{attr}" if path else attr, param)
                for path, module in self.model.named_modules()
                for attr, param in module._parameters.items() if param is not None}

    def uncovered_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The model's parameters (by ``named_parameters`` name) that no site exposes and whose
        every byte no site's parameter holds (a GPT-2 bridge's fused qkv, of which W_Q, W_K and
        W_V are views, is covered): what the sites leave of the model."""
        native = [self.native_parameter(n) for n in self.sites]
        ids, spans = {id(p) for p in native}, merged([span(p) for p in native if not p.is_meta])
        return [(n, p) for n, p in self.model.named_parameters() if id(p) not in ids and not inside(p, spans)]

    def weight_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """The model's floating-point buffers that hold weights (``WEIGHT_BUFFERS``), by
        ``named_buffers`` name; a bias of zeros counts as none. Rotary caches, masks and other
        buffers computed from the config are left out."""
        return [(n, b) for n, b in self.model.named_buffers()
                if n.rpartition(".")[2] in WEIGHT_BUFFERS and b.is_floating_point() and not zero_bias(n, b)]

    def held_in_buffers(self) -> dict[str, torch.Tensor]:
        """The weights with a TransformerLens name (``unembed.b_U``) that the model keeps in a
        buffer, in TransformerLens layout: no site exposes them, so they are never decomposed."""
        return {name: to_tl(self.model.get_buffer(path).detach()) for name, (path, to_tl) in self._in_buffers.items()}

    def uncovered_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """``weight_buffers`` without those ``held_in_buffers`` names."""
        named = {id(self.model.get_buffer(path)) for path, _ in self._in_buffers.values()}
        return [(n, b) for n, b in self.weight_buffers() if id(b) not in named]

    def tied_paths(self, name: str) -> list[str]:
        """Every slot that holds the Parameter behind ``name`` or a Parameter sharing its memory
        (``dec.weight = nn.Parameter(enc.weight.data.T)``): more than one when the model ties it
        to another weight. A bridge's fused qkv (``unread``), the source of W_Q/W_K/W_V views
        that the forward reads through them, is not a tie."""
        target = self.native_parameter(name)
        return [path for path, param in self._parameter_slots().values()
                if param is target or (id(param) not in self.unread and overlap(param, target))]

    def weight(self, name: str) -> torch.Tensor:
        """The weight in TransformerLens layout (a detached tensor, not a copy where a view works)."""
        return self._from_native[name](self.native_parameter(name).detach())

    def to_native(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return self._to_native[name](value)

    def functional_forward(self, overrides: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """Forward with some weights replaced by TL-layout tensors (keyed by TL name). Every other
        parameter enters detached: the result depends on the overrides only, so a backward through
        it never reaches (or leaves ``.grad`` on) the model's own parameters."""
        slots = self._parameter_slots()
        native = {path: param.detach() for path, param in slots.values()}
        for n, v in overrides.items():  # under the slot's own path: one slot is never swapped twice
            prefix, _, attr = self._param_path[n].rpartition(".")
            native[slots[id(self.model.get_submodule(prefix)), attr][0]] = self._to_native[n](v)
        return self._output(functional_call(self.model, native, (inputs,), strict=False, tie_weights=False))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._output(self.model(inputs))

    @staticmethod
    def _output(out: object) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits
        raise TypeError(f"the model returned {type(out).__name__}; l3d_lens needs a tensor of outputs (logits)")

    def head_modules(self) -> list[nn.Module]:
        """The modules from ``head_point`` to the logits, which token mode's backward shortcut
        takes to act on each position alone."""
        return []

    def check_layout(self) -> None:
        """Raise if the model was reconfigured since the adapter read it (fast engine)."""

    def check_no_backward_hooks(self) -> None:
        """L3D differentiates the model's forward pass: torch.func (engine='exact') cannot run
        backward hooks, and one may change the gradients the fast engine reads."""
        hooked = [name or "<the model>" for name, m in self.model.named_modules()
                  if m._backward_hooks or m._backward_pre_hooks]
        if torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks:
            hooked.append("<every module: a global hook>")
        if hooked:
            more = f" and {len(hooked) - 5} more" if len(hooked) > 5 else ""
            raise ValueError(f"the model has backward hooks on {', '.join(hooked[:5])}{more}: L3D differentiates the "
                             f"forward pass itself, which they may change (and torch.func cannot run); remove them "
                             f"first (TransformerLens: model.reset_hooks(including_permanent=True))")

    def capture_point(self, key: str) -> tuple[nn.Module, str]:
        """(module, role): the module whose first positional input ("in"), output ("out") or
        keyword argument (its name) is the activation."""
        return self._capture[key]

    def fingerprint(self, names: list[str]) -> dict[str, object]:
        """Shapes and a SHA-256 of the decomposed weights, to check a saved result's model."""
        h = hashlib.sha256()
        shapes = {}
        for n in sorted(names):
            w = self.weight(n).detach().to("cpu").contiguous()
            shapes[n] = list(w.shape)
            h.update(n.encode())
            h.update(w.to(torch.float64).numpy().tobytes())
        return {"shapes": shapes, "sha256": h.hexdigest()}

    # --- lifecycle ---------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Eval mode for the duration (no dropout), then every module's mode restored and
        every hook this library added removed, even if the body raises."""
        with eval_mode(self.model):
            yield

    @contextlib.contextmanager
    def forward_hooks(self, hooks: Mapping[nn.Module, Callable],
                      first: Optional[Mapping[nn.Module, Callable]] = None) -> Iterator[None]:
        """Attach PyTorch forward hooks (fn(module, args, kwargs, output) -> output) for the body
        only: ``hooks`` after every hook the module already has, ``first`` before them."""
        handles = []
        try:
            for module, fn in (first or {}).items():
                handles.append(module.register_forward_hook(fn, with_kwargs=True, prepend=True))
            for module, fn in hooks.items():
                handles.append(module.register_forward_hook(fn, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()


class TransformerLensAdapter(Adapter):
    """Shared by the TransformerLens adapters: sizes come from the model's ``cfg``."""

    is_language_model = True
    head_point = "unembed.hook_in"
    logits_point = "unembed.hook_out"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.cfg = model.cfg

    def _note_without_site(self, explained: set[int]) -> None:
        """Record in ``unsupported``, under its module-tree path, every parameter outside the
        sites (``uncovered_parameters``) that no reason given already covers (``explained``, by
        id): QK-norm and post-norm scales, an MLP's own LayerNorm, MoE experts. A selector that
        spans one then warns that it leaves it out, rather than silently decomposing less of the
        block than it names. A weight kept in a buffer outside ``held_in_buffers`` is recorded so too."""
        extra = [(name, NO_SITE) for name, p in self.uncovered_parameters() if id(p) not in explained]
        extra += [(name, IN_BUFFER) for name, _ in self.uncovered_buffers()]
        if extra:
            paths = self._readable_paths()
            for name, why in extra:
                prefix, _, attr = name.rpartition(".")
                self.unsupported.setdefault(f"{paths[id(self.model.get_submodule(prefix))]}.{attr}".lstrip("."), why)

    def _readable_paths(self) -> dict[int, str]:
        """Each module's shortest path with a bridge's wrapper segments (``_original_component``)
        dropped, so a name left out reads as a selector would write it (``blocks.0.attn.q_norm``)."""
        best: dict[int, str] = {}
        for path, module in self.model.named_modules(remove_duplicate=False):
            clean = ".".join(part for part in path.split(".") if part not in WRAPPERS)
            if id(module) not in best or len(clean) < len(best[id(module)]):
                best[id(module)] = clean
        return best

    def head_modules(self) -> list[nn.Module]:
        return list(self.model.get_submodule("unembed").modules())

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def n_heads(self) -> int:
        return self.cfg.n_heads

    @property
    def d_mlp(self) -> int:
        return getattr(self.cfg, "d_mlp", 0) or 0

    @property
    def n_ctx(self) -> int:
        return self.cfg.n_ctx

    @property
    def d_vocab(self) -> int:
        return self.cfg.d_vocab
