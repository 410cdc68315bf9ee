"""Quantized modules: :class:`QuantLinear` and the shared :class:`RuntimeState`."""
from .quant_linear import QuantLinear
from .state import RuntimeState, get_state

__all__ = ["QuantLinear", "RuntimeState", "get_state"]
