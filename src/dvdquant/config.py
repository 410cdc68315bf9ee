"""Typed, frozen, validated configuration dataclasses, one per quantization method.

A config says *what* to compute; the method registry (:mod:`dvdquant.algorithms.registry`)
says *how*. Every config validates itself on creation and raises :class:`ConfigError` with a
one-line message, so a bad value never reaches the numerics.

Bit-width vocabulary: ``w_bits`` ∈ 2..8 (integer weight grid), ``a_bits`` ∈ {4, 6, 8, 16}
(16 = activations left in floating point).

Weight-only layers: AdaLN / modulation Linears (``quantize_modulation``) read one timestep
embedding per sample, so quantizing their activations saves nothing and only adds error.
``quantize_`` quantizes them with ``config.weight_only()``: W{w_bits}A16, the method's weight
quantizer (BGR for DVD-Quant, RTN for the baselines), no rotation, no auto-scaling, no
smoothing, never switched by δ-GBS.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Optional

from .errors import ConfigError

ACT_BITS = (4, 6, 8, 16)
AutoScale = Literal["per_channel", "per_block", "none"]
Smoothing = Literal["none", "dynamic"]
MeanChannel = Literal["quantized", "exact"]
Rotation = Literal[True, False, "auto"]
HighBitFormat = Literal["int", "fp8_e4m3"]
AttentionMode = Literal["none", "int8", "fp8"]
ATTENTION_MODES = ("none", "int8", "fp8")


def _check_common(cfg) -> None:
    if not isinstance(cfg.w_bits, int) or not 2 <= cfg.w_bits <= 8:
        raise ConfigError(f"w_bits must be an integer in 2..8, got {cfg.w_bits!r}")
    if cfg.a_bits not in ACT_BITS:
        raise ConfigError(f"a_bits must be one of {ACT_BITS}, got {cfg.a_bits!r}")
    if cfg.group_size is not None and (not isinstance(cfg.group_size, int) or cfg.group_size < 2):
        raise ConfigError(f"group_size must be None (per channel) or an integer ≥ 2, got {cfg.group_size!r}")
    if cfg.a8_format not in ("int", "fp8_e4m3"):
        raise ConfigError(f"a8_format must be 'int' or 'fp8_e4m3', got {cfg.a8_format!r}")
    if not isinstance(cfg.skip, tuple):
        raise ConfigError("skip must be a tuple of module-name substrings or regexes")


@dataclass(frozen=True)
class _Common:
    w_bits: int = 4
    a_bits: int = 4
    group_size: Optional[int] = None      # None: per output channel
    symmetric: bool = False               # weight grid symmetric (z = 2^(b-1)) or asymmetric
    a8_format: HighBitFormat = "int"      # 8-bit activations: int8 grid or FP8 e4m3 (Hopper path)
    skip: tuple = ()                      # extra module names (substring or regex) left in high precision
    quantize_modulation: bool = False     # also quantize AdaLN / modulation Linears (weight-only, W{w_bits}A16)

    def __post_init__(self):
        _check_common(self)

    def weight_only(self):
        """The config for weight-only (modulation) layers: the baselines' weight quantizer, RTN, at A16.

        SmoothQuant / QuaRot / ViDiT-Q transform weights only to help the *activation* quantizer
        (smoothing, rotation, balance); with A16 there is none, so plain MinMax/RTN weights remain.
        """
        return MinMaxConfig(w_bits=self.w_bits, a_bits=16, group_size=self.group_size, symmetric=self.symmetric,
                            a8_format=self.a8_format, skip=self.skip, quantize_modulation=self.quantize_modulation)


@dataclass(frozen=True)
class BGRConfig:
    """Bounded-init Grid Refinement settings (weights only, data-free)."""

    shrink_min: float = 0.3       # smallest bound-shrink factor tried in the bounded init
    shrink_steps: int = 36        # number of shrink factors in [shrink_min, 1]
    max_iters: int = 60           # grid-refinement iterations at most
    tol: float = 1e-5             # stop when the relative error gain of an iteration falls below

    def __post_init__(self):
        if not 0.0 < self.shrink_min <= 1.0:
            raise ConfigError(f"bgr.shrink_min must be in (0, 1], got {self.shrink_min}")
        if self.shrink_steps < 1 or self.max_iters < 0 or self.tol < 0:
            raise ConfigError("bgr.shrink_steps ≥ 1, max_iters ≥ 0 and tol ≥ 0 are required")


@dataclass(frozen=True)
class GBSConfig:
    """δ-Guided Bit Switching: per-step activation bits from the output's relative L1 change."""

    delta: float = 0.12           # accumulated relative-L1 threshold
    low_bits: int = 4
    high_bits: int = 8
    warmup_steps: int = 2         # first steps forced to high bits
    final_high_steps: int = 0     # last steps forced to high bits (needs total steps)
    # "same_bits": across a bit switch the measured change also holds the switch's own quantization
    # noise, so the controller counts min(measured, last change measured at equal bits) there;
    # "raw": the paper's indicator, the measured change always (see algorithms/gbs.py).
    indicator: str = "same_bits"

    def __post_init__(self):
        if self.indicator not in ("same_bits", "raw"):
            raise ConfigError(f"gbs.indicator must be 'same_bits' or 'raw', got {self.indicator!r}")
        if self.delta < 0:
            raise ConfigError(f"gbs.delta must be ≥ 0, got {self.delta}")
        if self.low_bits not in ACT_BITS or self.high_bits not in ACT_BITS or self.low_bits > self.high_bits:
            raise ConfigError(f"gbs bits must be in {ACT_BITS} with low ≤ high, got {self.low_bits}/{self.high_bits}")
        if self.warmup_steps < 0 or self.final_high_steps < 0:
            raise ConfigError("gbs.warmup_steps and final_high_steps must be ≥ 0")


@dataclass(frozen=True)
class StepPolicyConfig:
    """dvdquant's step policy: per step, skip the tail blocks, run A4 or run A8, from one indicator
    (block 0's residual change accumulated since the last step that ran; algorithms/step_policy.py).

    Below ``skip_threshold`` the step reuses its cached tail residual, below ``bits_threshold`` it runs
    at ``low_bits``, else at ``high_bits``. ``budget``: the average cost per step relative to an A8
    step (0 < budget ≤ 1; None: fixed thresholds); the controller then scales both thresholds during
    the run so the realised mean cost tracks it. ``schedule``: a fixed action per step instead of the
    indicator, one character each (``S`` skip, ``4`` / ``6`` / ``8`` the tail's bits; the progress bar's
    letters), e.g. to replay on one model the schedule the policy chose on another; steps past its end
    run at ``high_bits``, a skip without a cached residual runs at ``high_bits``."""

    skip_threshold: float = 0.05  # τ: accumulated block-0 residual change below which the tail is skipped
    bits_threshold: float = 0.15  # δ: at or above, the step runs at high_bits; below, at low_bits
    low_bits: int = 4
    high_bits: int = 8
    warmup_steps: int = 2         # first steps run in full at high bits
    final_steps: int = 1          # last steps never skipped (needs the pipeline's number of steps)
    max_skips: int = 2            # consecutive skipped steps at most
    budget: Optional[float] = None
    schedule: Optional[str] = None

    def __post_init__(self):
        for name in ("skip_threshold", "bits_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"policy.{name} must be a number ≥ 0, got {v!r}")
        if self.skip_threshold > self.bits_threshold:
            raise ConfigError(f"policy.skip_threshold ({self.skip_threshold}) must be ≤ bits_threshold "
                              f"({self.bits_threshold})")
        if self.low_bits not in (4, 6, 8) or self.high_bits not in (4, 6, 8) or self.low_bits > self.high_bits:
            raise ConfigError(f"policy bits must be in (4, 6, 8) with low ≤ high, got {self.low_bits}/{self.high_bits}")
        for name in ("warmup_steps", "final_steps", "max_skips"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"policy.{name} must be an integer ≥ 0, got {v!r}")
        b = self.budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1):
            raise ConfigError(f"policy.budget must be in (0, 1] (mean step cost relative to an A8 step), got {b!r}")
        sch = self.schedule
        if sch is not None:
            if not isinstance(sch, str) or not sch or set(sch) - set("S468"):
                raise ConfigError(f"policy.schedule must be a non-empty string of S, 4, 6, 8 (one per step), got {sch!r}")
            if b is not None:
                raise ConfigError("policy.schedule and policy.budget exclude each other: a fixed schedule has its own cost")


@dataclass(frozen=True)
class DVDQuantConfig(_Common):
    """DVD-Quant: BGR weights + ARQ activations (+ optional δ-GBS). Each part can be switched off."""

    bgr: Optional[BGRConfig] = field(default_factory=BGRConfig)   # None: MinMax weights (ablation)
    # ARQ Hadamard rotation: True, False, or "auto" = rotate when some step quantizes activations below
    # 8 bits (a_bits < 8, δ-GBS or the step policy), not for static A8 (:meth:`rotates`).
    rotation: Rotation = "auto"
    rotation_block: Optional[int] = None   # None: full-size Hadamard; else block-diagonal blocks
    auto_scale: AutoScale = "per_channel"  # ARQ run-time channel scaling Λ_t
    scale_block: int = 128                 # channels per Λ block for auto_scale="per_block"
    gbs: Optional[GBSConfig] = None        # None: fixed a_bits every step
    policy: Optional[StepPolicyConfig] = None  # skip / A4 / A8 per step (instead of gbs)
    # Dynamic smoothing *before* the rotation (not in the paper; see QuantLinear and docs/RESULTS.md):
    # s_t = Λ_t^α / max|W_j|^(1−α) from the current tokens, x/s_t rotated and quantized, W·diag(s_t)·H
    # re-quantized (RTN) every forward from a master copy of W kept at ``smooth_master_bits``.
    smoothing: Smoothing = "none"
    smooth_alpha: float = 0.5
    smooth_master_bits: int = 8            # 8: int8 master of W/max|W_j| per row (2× int4 memory); 16: fp
    # The mean of each rotation block of the input (the constant Hadamard column of x·H carries it):
    # "quantized" = rotated and quantized with the rest; "exact" = x and W are split per block into their
    # mean and the centred remainder, the remainders rotated and quantized, and the product of the means
    # added in fp32 from a small table of W's block row sums (QuantLinear ``w_block_sum``).
    mean_channel: MeanChannel = "quantized"
    # 8-bit attention (docs/ATTENTION.md): "int8" = INT8 Q·Kᵀ + FP8 P·V, "fp8" = FP8 both, "none" = off.
    # A run-time setting, not a weight format: quantize_ and load install it on the model's attention.
    attention: AttentionMode = "int8"

    def __post_init__(self):
        super().__post_init__()
        if self.attention not in ATTENTION_MODES:
            raise ConfigError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.smoothing not in ("none", "dynamic"):
            raise ConfigError(f"smoothing must be 'none' or 'dynamic', got {self.smoothing!r}")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.mean_channel not in ("quantized", "exact"):
            raise ConfigError(f"mean_channel must be 'quantized' or 'exact', got {self.mean_channel!r}")
        if self.rotation not in (True, False, "auto"):
            raise ConfigError(f"rotation must be True, False or 'auto', got {self.rotation!r}")
        if self.mean_channel == "exact" and (not self.rotates() or self.smoothing != "none"):
            raise ConfigError("mean_channel='exact' needs rotation=True and smoothing='none' (it splits the mean "
                              "of each rotation block of the unsmoothed input)")
        if self.smooth_master_bits not in (8, 16):
            raise ConfigError(f"smooth_master_bits must be 8 or 16, got {self.smooth_master_bits!r}")
        if self.auto_scale not in ("per_channel", "per_block", "none"):
            raise ConfigError(f"auto_scale must be 'per_channel', 'per_block' or 'none', got {self.auto_scale!r}")
        if self.rotation_block is not None and self.rotation_block < 1:
            raise ConfigError(f"rotation_block must be None or ≥ 1, got {self.rotation_block}")
        if self.scale_block < 1:
            raise ConfigError(f"scale_block must be ≥ 1, got {self.scale_block}")
        if self.gbs is not None and self.a_bits == 16:
            raise ConfigError("a_bits=16 means weight-only layers, which δ-GBS never switches: set gbs=None "
                              "or a_bits to gbs.low_bits")
        if self.policy is not None and (self.gbs is not None or self.a_bits == 16):
            raise ConfigError("the step policy chooses each step's bits: set gbs=None and a_bits to 4, 6 or 8")

    def rotates(self) -> bool:
        """Whether the layers are rotated: ``rotation`` itself, or for "auto" whether any step quantizes
        activations below 8 bits: 8-bit activations do not need it, and rotated 4-bit weights lose more
        than they gain there (docs/RESULTS.md, quality section)."""
        if self.rotation != "auto":
            return bool(self.rotation)
        return self.a_bits < 8 or self.gbs is not None or self.policy is not None

    def weight_only(self) -> "DVDQuantConfig":
        """W{w_bits}A16 with BGR weights (as configured): no rotation, auto-scaling, smoothing or δ-GBS."""
        return replace(self, a_bits=16, rotation=False, rotation_block=None, auto_scale="none", gbs=None,
                       policy=None, smoothing="none", mean_channel="quantized")


@dataclass(frozen=True)
class MinMaxConfig(_Common):
    """MinMax / RTN: min-max weight grid, dynamic per-token activations."""


@dataclass(frozen=True)
class _Smoothed(_Common):
    """A baseline with static smoothing s_j = max|X_j|^α / max|W_j|^(1−α)."""

    alpha: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class SmoothQuantConfig(_Smoothed):
    """SmoothQuant: static per-channel smoothing from calibration statistics, then RTN."""


@dataclass(frozen=True)
class QuaRotConfig(_Common):
    """QuaRot: Hadamard rotation of weights and activations, RTN weights, per-token activations."""

    rotation_block: Optional[int] = None


@dataclass(frozen=True)
class ViDiTQConfig(_Smoothed):
    """ViDiT-Q style: dynamic per-token activations + timestep-aware channel balancing."""


# ----------------------------------------------------------------------------- (de)serialization
# The list of config classes is the method registry's (algorithms/registry.py: config_from_dict).
_NESTED = {"bgr": BGRConfig, "gbs": GBSConfig, "policy": StepPolicyConfig}


def config_to_dict(cfg) -> dict:
    """A JSON-able dict with the config's class name, for checkpoint metadata."""
    from dataclasses import asdict
    d = asdict(cfg)
    d["skip"] = list(cfg.skip)
    return {"type": type(cfg).__name__, "fields": d}


def config_from_fields(cls, fields: dict):
    """``cls(**fields)`` from :func:`config_to_dict`'s ``fields`` (nested configs and ``skip`` restored)."""
    fields = dict(fields)
    for key, sub in _NESTED.items():
        if fields.get(key) is not None:
            fields[key] = sub(**fields[key])
    fields["skip"] = tuple(fields.get("skip", ()))
    return cls(**fields)
