"""Reading a decomposition: where subnetworks live (heads, neurons) and what they do."""

from .attribution import attribution, head_attribution, head_tensor, neuron_attribution

__all__ = ["attribution", "head_attribution", "head_tensor", "neuron_attribution"]
