"""Orthogonal Hadamard matrices for every hidden size the video DiTs use.

Hidden sizes are a power of two times a small factor (3072 = 12·256, 5120 = 20·256,
1920 = 60·32, 13824 = 108·128, 8960 = 140·64, 21504 = 84·256 …). We build
``H_n = H_base ⊗ H_{2^a}`` where ``H_{2^a}`` is Sylvester's and ``H_base`` comes from a
Paley construction on a prime q:

* Paley I  (q ≡ 3 mod 4): order q + 1,
* Paley II (q ≡ 1 mod 4): order 2(q + 1).

Matrices are returned normalised (``H Hᵀ = I``). Sizes with no construction here (e.g. 52)
can still be rotated block-diagonally with the largest constructible block that divides them.

Online rotation of activations, defined so that every device computes the same bits
----------------------------------------------------------------------------------
:func:`hadamard_rotate_exact` is *the* definition of the online activation rotation x·H that
the simulated, emulated and FP8 paths share (the offline weight rotation uses the plain
:func:`hadamard_rotate`)::

    x' = snap(x)                       each (token, R-block) segment rounded to a grid of
                                       u = 2^(⌊log2 max|segment|⌋ − 14), half to even
    y  = fp32( x' · blockdiag(S_R) )   S_R the ±1 Hadamard pattern; the sums are *exact*
    y ← y · fp32(1/√R)                 one fp32 multiply

After the snap every entry is an integer multiple of u below 2^15·u in magnitude, so each
±1 sum of up to R ≤ 512 of them is an integer below 2^24 units: exact in fp32, in any order,
on CPU, in cuBLAS and in the tensor cores of the fused Triton kernel alike. Larger R round
their exact sum once to fp32 (:func:`exact_pm1_rotation_sum`: exact fp32 stages up to 512
terms, then one rounding fp32 add for R = 1024, fp64 otherwise). Without the snap, the fp32 sum of a wide-range
segment rounds differently per summation order, a rotated value on a quantizer's rounding
boundary moves one code, and over a 4-bit diffusion trajectory that difference grows into a
different clip. The snap's error is at most u/2 = 2^-15 of the segment's largest entry.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from ..errors import ConfigError
from .reduce import absmax
from .scratch import scratch


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    i = 2
    while i * i <= q:
        if q % i == 0:
            return False
        i += 1
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = Legendre symbol of (j − i) mod q (0 on the diagonal)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).view(1, -1) - torch.arange(q).view(-1, 1)) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    qm = _jacobsthal(q)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = qm
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    qm = _jacobsthal(q)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = 1.0
    s[1:, 1:] = qm
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(s, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _base_kind(m: int) -> Optional[str]:
    """Which construction gives a base matrix of order m ("trivial", "paley1", "paley2"), if any."""
    if m in (1, 2):
        return "trivial"
    if m % 4 != 0:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1"
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def _base_matrix(m: int) -> Optional[torch.Tensor]:
    """An unnormalised ±1 Hadamard matrix of order m from Paley, or None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4 != 0:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


def _decompose(n: int) -> Optional[tuple[int, int]]:
    """n = base · 2^a with a constructible base; prefer the smallest base."""
    if n < 1:
        return None
    p2 = 1
    candidates = []
    while n % p2 == 0:
        candidates.append((n // p2, p2))
        p2 *= 2
    for base, pow2 in sorted(candidates):
        if _base_kind(base) is not None:
            return base, pow2
    return None


def can_build_hadamard(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build an order-``n`` matrix."""
    return _decompose(n) is not None


@lru_cache(maxsize=32)
def _hadamard_f64(n: int) -> torch.Tensor:
    dec = _decompose(n)
    if dec is None:
        raise ConfigError(f"no Hadamard construction for size {n} (need 2^a · m with a Paley order m)")
    base, pow2 = dec
    h = _base_matrix(base)
    syl = torch.ones(1, 1, dtype=torch.float64)
    two = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while syl.shape[0] < pow2:
        syl = torch.kron(syl, two)
    return torch.kron(h, syl) / (n ** 0.5)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Normalised (orthogonal) Hadamard matrix of order ``n``."""
    return _hadamard_f64(n).to(dtype=dtype, device=device)


@lru_cache(maxsize=64)
def _hadamard_on(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return hadamard_matrix(n, dtype, device)


def cached_hadamard(n: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`hadamard_matrix` of order ``n`` on ``device``, built once per (n, dtype, device) and shared:
    the one cache of the online rotation's blocks (QuantLinear and the FP8 path). Never write to it."""
    return _hadamard_on(n, dtype, str(torch.device(device)))


def largest_hadamard_block(n: int, limit: Optional[int] = None) -> int:
    """Largest constructible order b dividing n (and ≤ limit, if given)."""
    divisors = [b for b in range(1, n + 1) if n % b == 0 and (limit is None or b <= limit)]
    return max(b for b in divisors if can_build_hadamard(b))


def block_hadamard(n: int, block: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Dense block-diagonal (n, n) matrix with order-``block`` Hadamard blocks."""
    if n % block != 0:
        raise ConfigError(f"Hadamard block {block} does not divide size {n}")
    return torch.block_diag(*([hadamard_matrix(block, torch.float64)] * (n // block))).to(dtype=dtype, device=device)


def _check_block(x: torch.Tensor, block: int) -> int:
    """The last dimension n of ``x``, after checking that ``block`` divides it."""
    n = x.shape[-1]
    if n % block != 0:
        raise ConfigError(f"Hadamard block {block} does not divide the last dimension {n}")
    return n


# ----------------------------------------------------------------------------- exact online rotation
SNAP_BITS = 14           # snap grid u = 2^(exponent of the segment's max − SNAP_BITS)
_MIN_BIASED_EXP = 15     # u ≥ 2^-126 (the smallest normal fp32)
_MAX_BIASED_EXP = 245    # 1.5·2^23·u stays finite (segments above 2^118 are not activations)


def inv_sqrt_r(r: int) -> float:
    """fp32(1/√R), as a Python float: the factor applied once after the exact ±1 sums."""
    return float(torch.tensor(1.0 / r ** 0.5, dtype=torch.float32))


def snap_magic(amax: torch.Tensor) -> torch.Tensor:
    """1.5·2^23·u (fp32) for segment maxima ``amax`` ≥ 0, u = 2^(e_max − 14), built from the exponent bits.

    Adding and subtracting it rounds a value |x| < 2^22·u to a multiple of u, half to even:
    the sum lands in [2^23·u, 2^24·u), whose ulp is u. The Triton kernels build the same number.
    """
    e = (amax.float().contiguous().view(torch.int32) >> 23).clamp(_MIN_BIASED_EXP, _MAX_BIASED_EXP)
    return (((e + 9) << 23) | 0x400000).view(torch.float32)        # biased exponent of u·2^23, mantissa 1.5


def snap_to_rotation_grid(x: torch.Tensor, block: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Round fp32 ``x`` (..., n) per (row, ``block``-segment) to the grid u = 2^(e_max − 14).

    e_max is the fp32 exponent of the segment's largest magnitude; ``(x + m) − m`` with
    m = :func:`snap_magic` does the rounding in two exact-by-construction IEEE operations, which the
    Triton kernels perform identically. NaN/Inf stay non-finite (the callers detect them).
    ``out``: a contiguous fp32 buffer of ``x``'s size to write the result into (returned, shaped like ``x``).
    """
    xf = x.float()
    n = xf.shape[-1]
    seg = xf.reshape(*xf.shape[:-1], n // block, block)
    magic = snap_magic(absmax(seg, -1, keepdim=True))
    if out is None:
        return (seg + magic).sub_(magic).reshape(xf.shape)
    return torch.add(seg, magic, out=out.view(seg.shape)).sub_(magic).view(xf.shape)


@lru_cache(maxsize=64)
def _pm1_factors_f64(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """±1 Kronecker factors (A: base×base, B: p2×p2) of the unnormalised order-n matrix."""
    a, b = _factors_f64(n)
    return torch.sign(a), torch.sign(b)


def fp32_matmul_is_ieee(device) -> bool:
    """Whether an fp32 matmul on ``device`` multiplies and adds in IEEE fp32 (no TF32 / bf16 inputs)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    return not (torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32)


_EXACT_UNITS = 2 ** 24                 # fp32 holds every integer up to 2^24 exactly
_SNAP_UNITS = 2 ** (SNAP_BITS + 1)     # a snapped entry is at most 2^15 grid units in magnitude
SYLVESTER_MATMUL = _EXACT_UNITS // _SNAP_UNITS   # 512: the first ±1 stage, fp32 matmuls over this many columns


@lru_cache(maxsize=64)
def _sylvester_pm1(p: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The ±1 Sylvester matrix of order p (a power of two), H_2^{⊗log2 p}, on ``device``."""
    return torch.sign(hadamard_matrix(p, torch.float64)).to(dtype=dtype, device=device)


def _tracks_grad(t: torch.Tensor) -> bool:
    return t.requires_grad and torch.is_grad_enabled()


def _sylvester_split(p: int) -> tuple[int, int]:
    """(a, b) with a·b = p (a power of two), a ≈ b, a ≤ b: S_p = S_a ⊗ S_b."""
    a = 1 << ((p.bit_length() - 1) // 2)
    return a, p // a


def _sylvester_stage(v: torch.Tensor, p: int, in_place: bool = False) -> tuple:
    """v (..., p) · S_p, S_p the ±1 Sylvester matrix of order p, as two small matmuls: S_p = S_a ⊗ S_b
    (a·b = p, a ≈ b), so x·S_p = vec(S_a · X · S_b) with X = x viewed (a, b). O(a + b) multiply-adds per
    entry instead of O(p). For the callers' exact integer-valued sums the result is the dense product's
    (which is also why the products may take whichever GEMM form is fastest: ``out=``).

    Returns (result, spare): ``in_place`` (``v`` contiguous) writes the result into ``v``; ``spare`` is a free
    buffer of ``v``'s size and dtype (the intermediate product) or None."""
    a, b = _sylvester_split(p)
    if a < 4:
        return v @ _sylvester_pm1(p, v.dtype, str(v.device)), None
    dev = str(v.device)
    x = v.reshape(-1, b)
    if _tracks_grad(v):                                                            # out= has no autograd
        y = (x @ _sylvester_pm1(b, v.dtype, dev)).view(-1, a, b)
        return torch.matmul(_sylvester_pm1(a, v.dtype, dev), y).reshape(v.shape), None
    y = torch.mm(x, _sylvester_pm1(b, v.dtype, dev), out=torch.empty_like(x, memory_format=torch.contiguous_format))
    y = y.view(-1, a, b)                                                           # · S_b over the low index
    s_a = _sylvester_pm1(a, v.dtype, dev)                                          # S_a · over the high index
    if in_place:
        return torch.bmm(s_a.expand(y.shape[0], a, a), y, out=v.view(y.shape)).view(v.shape), y
    return torch.matmul(s_a, y).reshape(v.shape), y


def _butterfly(v: torch.Tensor, h: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One Sylvester stage over dim −2 of ``v`` (..., P, C): rows j and j + h of each 2h-group → (sum, difference).
    ``out``: a contiguous buffer of ``v``'s size and dtype for the result (not ``v``), else a new one."""
    *lead, p, c = v.shape
    pairs = v.reshape(*lead, p // (2 * h), 2, h, c)
    out = torch.empty_like(pairs) if out is None else out.view(pairs.shape)
    torch.add(pairs[..., 0, :, :], pairs[..., 1, :, :], out=out[..., 0, :, :])
    torch.sub(pairs[..., 0, :, :], pairs[..., 1, :, :], out=out[..., 1, :, :])
    return out.reshape(v.shape)


def exact_pm1_rotation_sum(xs: torch.Tensor, block: int, overwrite: bool = False) -> torch.Tensor:
    """xs (..., n) · blockdiag(S_block, …) for the ±1 pattern S = A ⊗ B of the order-``block`` matrix,
    summed exactly and rounded once to fp32, for entries that are multiples of one grid unit u per
    (row, block) segment below 2^15·u in magnitude (:func:`snap_to_rotation_grid`).

    The Sylvester factor B = H_2^{⊗a} runs as fp32 matmuls over its last ``SYLVESTER_MATMUL`` = 512
    columns (two small ones, :func:`_sylvester_stage`; 512 entries of at most 2^15 units sum to at most 2^24),
    then one add/subtract stage per remaining factor H_2, then the
    Paley factor A as a matmul. Every stage is exact in fp32 while its sums stay within 2^24 grid
    units; a final H_2 stage (no A after it) may go past, since one fp32 add of two exact values
    rounds once, as required. Any other stage past 2^24 units runs in fp64 (exact here), rounded
    once at the end. Without an IEEE fp32 matmul (TF32, reduced precision) everything runs in fp64.
    ``overwrite``: ``xs`` is the caller's scratch (the stages may write into it).
    """
    _check_block(xs, block)
    a, b = _pm1_factors_f64(block)
    base, p2 = a.shape[0], b.shape[0]
    ieee = fp32_matmul_is_ieee(xs.device)
    dt = torch.float32 if ieee and _SNAP_UNITS * min(p2, SYLVESTER_MATMUL) <= _EXACT_UNITS else torch.float64
    p_lo = min(p2, SYLVESTER_MATMUL)
    v = xs.to(dt).reshape(-1, base, p2 // p_lo, p_lo)                       # (rows·n/block, base, p_hi, p_lo)
    own = (overwrite or v.data_ptr() != xs.data_ptr()) and v.is_contiguous()   # a buffer the stages may write
    v, spare = _sylvester_stage(v, p_lo, in_place=own)
    units, h = p_lo, 1
    while h < p2 // p_lo:                                                 # remaining H_2 factors of B
        units *= 2
        last = base == 1 and h * 2 == p2 // p_lo
        if v.dtype == torch.float32 and units > _EXACT_UNITS // _SNAP_UNITS and not last:
            v, spare = v.double(), None
        v, spare = _butterfly(v, h, spare), v                            # two buffers, in turn
        h *= 2
    if base > 1:                                                          # Aᵀ·V (A need not be symmetric)
        if v.dtype == torch.float32 and (units * base > _EXACT_UNITS // _SNAP_UNITS or not ieee):
            v = v.double()
        af = a.to(dtype=v.dtype, device=v.device)
        v = (v.reshape(-1, base, p2).transpose(-1, -2) @ af).transpose(-1, -2)
    return v.float().reshape(xs.shape)


def hadamard_rotate_exact(x: torch.Tensor, block: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The online activation rotation (module doc): snap, exact ±1 sums, then · fp32(1/√R); fp32 out.
    ``out``: a contiguous fp32 buffer of ``x``'s size the result may be written into (use the returned tensor)."""
    _check_block(x, block)
    a, b = _pm1_factors_f64(block)
    if (a.shape[0] == 1 and 16 <= block <= 2 * SYLVESTER_MATMUL and fp32_matmul_is_ieee(x.device)
            and not _tracks_grad(x)):
        return _rotate_sylvester_fp32(x, block, out)
    y = exact_pm1_rotation_sum(snap_to_rotation_grid(x, block), block, overwrite=True)
    return y.mul_(inv_sqrt_r(block))


def _rotate_sylvester_fp32(x: torch.Tensor, block: int, out: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`hadamard_rotate_exact` for a Sylvester block of 16 to 1024 (fp32, IEEE matmuls): the same stages
    as :func:`exact_pm1_rotation_sum` (two matmuls over up to 512 columns, then for 1024 the rounding
    add/subtract stage), written in turn into the result and one :func:`~.scratch.scratch` buffer so that
    the last stage lands in the result."""
    p_lo = min(block, SYLVESTER_MATMUL)
    a, b = _sylvester_split(p_lo)
    dev = str(x.device)
    result = torch.empty(x.shape, dtype=torch.float32, device=x.device) if out is None else out.view(x.shape)
    spare = scratch(x.numel(), torch.float32, x.device, "hadamard.rotation")
    first, second = (result, spare) if block == p_lo else (spare, result)       # the last write goes to result
    xs = snap_to_rotation_grid(x, block, out=first)
    y = torch.mm(xs.view(-1, b), _sylvester_pm1(b, torch.float32, dev), out=second.view(-1, b))
    rows = y.shape[0] // a
    v = torch.bmm(_sylvester_pm1(a, torch.float32, dev).expand(rows, a, a), y.view(rows, a, b),
                  out=first.view(rows, a, b))
    if block > p_lo:                                               # H_2 ⊗ S_512: one add/subtract, rounding once
        v = _butterfly(v.view(-1, 1, 2, p_lo), 1, second)
    return v.view(x.shape).mul_(inv_sqrt_r(block))


def rotate_pm1_exact(x: torch.Tensor, h_block: torch.Tensor) -> torch.Tensor:
    """Like :func:`hadamard_rotate_exact` for an explicit normalised block ``h_block`` (R, R), dense."""
    r = h_block.shape[0]
    n = _check_block(x, r)
    xs = snap_to_rotation_grid(x, r)
    sign = torch.sign(h_block.detach().double()).to(xs.device)
    y = xs.double().reshape(*xs.shape[:-1], n // r, r) @ sign               # exact in fp64
    return y.float().reshape(xs.shape) * inv_sqrt_r(r)


def rotate_last_dim(x: torch.Tensor, h_block: torch.Tensor) -> torch.Tensor:
    """x (..., n) · blockdiag(h_block, …): each consecutive ``b``-slice times h_block (b, b)."""
    b = h_block.shape[0]
    n = _check_block(x, b)
    xs = x.reshape(*x.shape[:-1], n // b, b)
    return (xs @ h_block.to(dtype=x.dtype, device=x.device)).reshape(x.shape)


@lru_cache(maxsize=64)
def _factors_f64(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised Kronecker factors (A: base×base, B: p2×p2) with H_n = A ⊗ B."""
    base, pow2 = _decompose(n) or (None, None)
    if base is None:
        raise ConfigError(f"no Hadamard construction for size {n} (need 2^a · m with a Paley order m)")
    return hadamard_matrix(base, torch.float64), hadamard_matrix(pow2, torch.float64)


def hadamard_rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., n) · blockdiag(H_block, …) without forming H: O(n·(base + 2^a)) work per row.

    With H_block = A ⊗ B and each block segment v viewed as V (base, 2^a): v·H = vec(Aᵀ V B).
    """
    n = _check_block(x, block)
    a, b = _factors_f64(block)
    a, b = a.to(dtype=x.dtype, device=x.device), b.to(dtype=x.dtype, device=x.device)
    v = x.reshape(*x.shape[:-1], n // block, a.shape[0], b.shape[0])
    y = torch.matmul(a.t(), torch.matmul(v, b))          # (..., n/block, base, p2)
    return y.reshape(x.shape)
