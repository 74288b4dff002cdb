"""Adapter for a plain ``torch.nn.Module`` (the paper's toy MLPs, or any regression model).

Weights keep their own parameter names and shapes. Those of ``nn.Linear`` layers get the
fast engine (input and output captured around the layer); any other parameter is exact-only.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Site, identity


class ModuleAdapter(Adapter):
    kind = "module"
    is_language_model = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        linear = {}
        for path, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                linear[f"{path}.weight" if path else "weight"] = (mod, path, "weight")
                if mod.bias is not None:
                    linear[f"{path}.bias" if path else "bias"] = (mod, path, "bias")
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name in linear:
                mod, path, attr = linear[name]
                key = path or "<root>"
                if attr == "weight":
                    site = Site(name, "weight", None, ("out", "in"), shape, ("in",), ("out",), f"{key}:in", f"{key}:out")
                else:
                    site = Site(name, "bias", None, ("out",), shape, (), ("out",), None, f"{key}:out")
                self._capture[f"{key}:in"] = (mod, "in")
                self._capture[f"{key}:out"] = (mod, "out")
            else:
                site = Site(name, "parameter", None, tuple(f"dim{j}" for j in range(p.dim())), shape)
            self.sites[name] = site
            self._param_path[name] = name
            self._to_native[name] = identity
            self._from_native[name] = identity

    def weight_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """Every floating-point buffer the model saves with its state (BatchNorm's running
        statistics): l3d_lens runs the model in eval mode, where they set the forward and so every
        gradient. Buffers left out of the state (caches) are left out here too."""
        saved = set(self.model.state_dict(keep_vars=True))
        return [(n, b) for n, b in self.model.named_buffers() if n in saved and b.is_floating_point()]
