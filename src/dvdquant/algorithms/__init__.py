"""DVD-Quant's parts (BGR, ARQ, δ-GBS) and the method registry."""
from . import dvd  # noqa: F401  (registers the dvdquant method)
from .bgr import bgr_quantize
from .gbs import GBSController, StepIndexHook
from .registry import LayerInfo, QuantMethod, get_method, register_method, registered_methods

__all__ = ["bgr_quantize", "GBSController", "StepIndexHook", "LayerInfo", "QuantMethod", "get_method",
           "register_method", "registered_methods"]
