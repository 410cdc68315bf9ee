"""Evaluation: prompt-adherence classifier, fidelity/temporal metrics, the quality report.

``evaluate`` (methods × bit-widths on the embedded model, :mod:`dvdquant.eval.quality`) is
imported lazily, so that ``import dvdquant.eval.video_metrics`` stays light.
"""

__all__ = ["evaluate", "METHODS", "BITS"]


def __getattr__(name):
    if name in __all__:
        from . import quality
        return getattr(quality, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
