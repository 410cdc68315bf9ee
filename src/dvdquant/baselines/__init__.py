"""Baseline methods (MinMax/RTN, QuaRot, SmoothQuant, ViDiT-Q-style), registered on import."""
from . import methods  # noqa: F401  (registers the methods)
from .calibration import CalibrationStats, collect_input_absmax

__all__ = ["CalibrationStats", "collect_input_absmax"]
