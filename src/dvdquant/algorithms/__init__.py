"""DVD-Quant's parts (BGR, ARQ, δ-GBS) and the method registry."""
from . import dvd  # noqa: F401  (registers the dvdquant method)
from .bgr import bgr_quantize
from .gbs import FixedBits, GBSController
from .registry import (LayerInfo, QuantMethod, config_from_dict, get_method, method_by_name, register_method,
                       registered_methods)

__all__ = ["bgr_quantize", "FixedBits", "GBSController", "LayerInfo", "QuantMethod", "config_from_dict", "get_method",
           "method_by_name", "register_method", "registered_methods"]
