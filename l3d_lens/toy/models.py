"""The paper's four toy models, built from ``nn.Linear`` layers so that every weight gets the
fast engine, with readable parameter names (``encoder.weight``, ``decoder.bias``, ``layers.2.weight``).

- ``SuperpositionModel``: x -> ReLU(W_out W_in x + b). With 5 inputs, 2 hidden and 5 outputs it
  is TMS (toy model of superposition, trained to reproduce x); with 10 -> 5 -> 10 trained on
  x -> A x it is TMCS (circuit superposition); with 25 grouped inputs it is the higher-rank
  circuits model. Unlike Anthropic's TMS the decoder is not tied to the encoder (the paper writes
  W_out W_in; tying would make one weight serve two layers, which the fast engine cannot see).
- ``SquareMLP``: a GeLU MLP (4 hidden layers of 5 by default) trained on x_i -> x_i^2.

Every model is built in float32 whatever ``torch.get_default_dtype()`` says (the seeded init
draws other values in float64, not only more digits), so that a seed gives the same weights in
any session; ``.to(torch.float64)`` after building, for float64.

Initialisation follows the paper's code by default (``init="paper"``: N(0, 1) weights for the
superposition models, U(0, 1) weights for the MLP, zero biases). PyTorch's default init
(``init="torch"``) gives the ReLU outputs negative biases, and about half the TMCS and
higher-rank models trained from it end with an output that is dead for every input (training
loss 0.26 instead of 0.043 for TMCS); the paper's init trained 6 of 6 seeds to the good minimum.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Optional

import torch
from jaxtyping import Float
from torch import nn


INITS = ("paper", "torch")


def _seeded_init_(module: nn.Module, seed: int, init: str = "torch", paper_weight=None) -> None:
    """Re-initialise every ``nn.Linear`` of ``module`` from one generator, so a model depends
    on ``seed`` only and not on the global RNG. ``init="torch"``: PyTorch's default
    Kaiming-uniform weights and biases; ``init="paper"``: the paper's code, weights drawn by
    ``paper_weight(tensor, generator)`` and zero biases."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                if init == "paper":
                    paper_weight(layer.weight, gen)
                    if layer.bias is not None:
                        layer.bias.zero_()
                    continue
                bound = 1.0 / layer.in_features ** 0.5
                layer.weight.uniform_(-bound, bound, generator=gen)
                if layer.bias is not None:
                    layer.bias.uniform_(-bound, bound, generator=gen)


@contextlib.contextmanager
def _built_on_cpu():
    """Build the layers on the CPU, where ``_seeded_init_``'s generator is, whatever
    ``torch.set_default_device`` says (move the model after). ``nn.Linear`` draws its default
    init from torch's global generator, which ``_seeded_init_`` then overwrites: the global state
    is restored, so that building (or loading) a toy leaves a user's seeded cells as they were."""
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        yield


class SuperpositionModel(nn.Module):
    """x -> ReLU(decoder(encoder(x))): ``encoder.weight`` is W_in [hidden, in] (no bias),
    ``decoder.weight`` is W_out [out, hidden] and ``decoder.bias`` is b [out].

    One class serves TMS, TMCS and the higher-rank model: they differ only in sizes and data.
    """

    def __init__(self, n_in: int = 5, n_hidden: int = 2, n_out: Optional[int] = None, seed: int = 0,
                 init: str = "paper"):
        super().__init__()
        with _built_on_cpu():
            self.encoder = nn.Linear(n_in, n_hidden, bias=False, dtype=torch.float32)
            self.decoder = nn.Linear(n_hidden, n_in if n_out is None else n_out, dtype=torch.float32)
        _seeded_init_(self, seed, init, lambda w, g: w.normal_(0.0, 1.0, generator=g))

    def forward(self, x: Float[torch.Tensor, "batch n_in"]) -> Float[torch.Tensor, "batch n_out"]:
        return torch.relu(self.decoder(self.encoder(x)))


class SquareMLP(nn.Module):
    """x -> layers[-1](GeLU(... GeLU(layers[0](x)))): an MLP whose hidden layers all have the
    same width, trained to square each input feature (the paper's "complex loss landscape"
    model). Parameters are ``layers.<i>.weight`` / ``layers.<i>.bias``."""

    def __init__(self, n_features: int = 5, hidden: Sequence[int] = (5, 5, 5, 5), seed: int = 0,
                 init: str = "paper"):
        super().__init__()
        dims = [n_features, *hidden, n_features]
        with _built_on_cpu():
            self.layers = nn.ModuleList(nn.Linear(a, b, dtype=torch.float32) for a, b in zip(dims[:-1], dims[1:]))
        _seeded_init_(self, seed, init, lambda w, g: w.uniform_(0.0, 1.0, generator=g))

    def forward(self, x: Float[torch.Tensor, "batch n_features"]) -> Float[torch.Tensor, "batch n_features"]:
        for layer in self.layers[:-1]:
            x = nn.functional.gelu(layer(x))
        return self.layers[-1](x)


def tms(seed: int = 0) -> SuperpositionModel:
    """TMS: 5 features squeezed through 2 hidden dimensions and decoded back."""
    return SuperpositionModel(5, 2, 5, seed=seed)


def tmcs(seed: int = 0) -> SuperpositionModel:
    """TMCS: 10 inputs, 5 hidden, 10 outputs; trained on x -> A x (see ``data.circuit_matrix``)."""
    return SuperpositionModel(10, 5, 10, seed=seed)


def higher_rank(seed: int = 0, n_in: int = 25, n_hidden: int = 5, n_out: int = 10) -> SuperpositionModel:
    """The higher-rank circuits model: TMCS's shape with 25 inputs whose activity is tied in
    groups of 5 (the grouping lives in the data, ``data.grouped_features``)."""
    return SuperpositionModel(n_in, n_hidden, n_out, seed=seed)


def square_mlp(seed: int = 0, n_features: int = 5, width: int = 5, depth: int = 4, init: str = "torch") -> SquareMLP:
    """The x -> x^2 GeLU MLP: ``depth`` hidden layers of ``width`` units. PyTorch's init by
    default: from the paper's U(0, 1) weights, 1 to 3 of the 5 features were never learned
    (their output stayed constant) in 3 of 3 seeds here."""
    return SquareMLP(n_features, (width,) * depth, seed=seed, init=init)
