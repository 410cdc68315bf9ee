"""Evaluation: prompt-adherence classifier, the quality report (fidelity/temporal metrics:
:mod:`dvdquant.numerics.video_metrics`).

``evaluate`` (methods × bit-widths on the embedded model, :mod:`dvdquant.eval.quality`) is
imported lazily, so that ``import dvdquant.eval.classifier`` stays light.
"""

__all__ = ["evaluate", "METHODS", "BITS"]


def __getattr__(name):
    if name in __all__:
        from . import quality
        return getattr(quality, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
