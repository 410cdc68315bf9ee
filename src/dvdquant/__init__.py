"""dvdquant: data-free W4A4/W4A8 quantization of video diffusion transformers (DVD-Quant).

Public API::

    import dvdquant
    report = dvdquant.quantize_(pipe.transformer, dvdquant.DVDQuantConfig(w_bits=4, a_bits=4))
    video = pipe(prompt).frames                      # any diffusers pipeline: δ-GBS runs as its hook
    dvdquant.step_controller(pipe.transformer).schedule
"""
from ._version import __version__

from .api import (LayerReport, QuantReport, quantize_, quantized_layers, restack_step_hook, set_backend,
                  set_step_policy, share_step_controller, step_controller)
from .config import (BGRConfig, DVDQuantConfig, GBSConfig, MinMaxConfig, QuaRotConfig, SmoothQuantConfig,
                     StepPolicyConfig, ViDiTQConfig)
from .errors import CheckpointError, ConfigError, DVDQuantError, NonFiniteError
from .kernels.execution import ExecutionConfig
from .kernels.finite import raise_if_nonfinite
from .nn import QuantLinear, RuntimeState, get_state
from .serialization import load, read_metadata, save


__all__ = ["quantize_", "quantized_layers", "set_backend", "step_controller", "share_step_controller",
           "restack_step_hook", "set_step_policy", "StepPolicyConfig", "ExecutionConfig",
           "LayerReport", "QuantReport", "BGRConfig", "DVDQuantConfig", "GBSConfig", "MinMaxConfig", "QuaRotConfig", "SmoothQuantConfig",
           "ViDiTQConfig", "CheckpointError", "ConfigError", "DVDQuantError", "NonFiniteError", "QuantLinear",
           "RuntimeState", "get_state", "load", "raise_if_nonfinite", "read_metadata", "save", "__version__"]
