"""Model adapters (which layers to quantize) and the embedded default model."""
from .adapters import ADAPTERS, ModelAdapter, adapter_for, select_linears, weight_only_layers

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for", "select_linears", "weight_only_layers"]
