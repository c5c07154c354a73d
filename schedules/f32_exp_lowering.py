"""float32 exp and sigmoid on CPUs as vector arithmetic, not one libm call per lane.

TVM lowers `exp` (and `sigmoid` = 1 / (1 + exp(-x))) for LLVM targets to LLVM's exp intrinsic, which
LLVM turns into a scalar `expf` call per lane of a vector: 32 calls for a 16-lane sigmoid plus exp. A
model with SiLU / swish activations (EfficientNet-B0, exported by torch or Keras) spent most of its time
there. Registered here as TVM's intrinsic lowering for `llvm` targets (x86 and aarch64), above TVM's own
rule, so every kernel that uses them gets straight-line code that vectorises:

  exp(x) = 2^n * e^r,  n = round(x / ln 2) (to nearest, by adding 1.5 * 2^23),  r = x - n ln 2 (ln 2 in two
  parts, so r is exact enough),
  e^r by its degree-6 Taylor-like polynomial with Cephes' expf coefficients (|r| <= ln 2 / 2), and 2^n
  built from its exponent bits. Relative error within 2 float32 ulps of the true value on the normal
  range (tests/test_exp_lowering.py); x above 88.72 gives inf, below -87.33 gives 0 (no subnormal
  results), NaN stays NaN (the clamps let it through).
"""
from __future__ import annotations

from tvm import tirx
from tvm.tirx.op import register_intrin_lowering

LEVEL = 99                 # above TVM's own rules (level 10)
HI, LO = 88.72283935546875, -87.33654022216797      # exp's float32 normal range: beyond, inf / 0
LOG2E = 1.4426950408889634
ROUNDER = 12582912.0       # 1.5 * 2^23: added to a float below 2^22 in size, rounds it to an integer
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4        # ln 2 = hi + lo, hi with few mantissa bits
# e^r - 1 - r = r^2 * P(r), P's coefficients from Cephes' expf (Moshier)
P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _const(v: float, like) -> tirx.PrimExpr:
    c = tirx.FloatImm("float32", v)
    lanes = like.ty.dtype.lanes
    return tirx.Broadcast(c, lanes) if lanes > 1 else c


def clamp(x: tirx.PrimExpr, lo: float, hi: float) -> tirx.PrimExpr:
    """x held to [lo, hi], NaN staying NaN: written as selects that are false for NaN, which x86 code generation
    turns into one max and one min with their operands in the order that returns x when it is NaN (TVM's
    Min / Max return the bound), so no separate NaN test is needed after the arithmetic (NaN in, NaN out)."""
    lo_, hi_ = _const(lo, x), _const(hi, x)
    x = tirx.Select(x < lo_, lo_, x)
    return tirx.Select(x > hi_, hi_, x)


def exp_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """exp(x) for a float32 scalar or vector expression, as arithmetic on it."""
    c = lambda v: _const(v, x)     # noqa: E731
    y = _exp_in_range(clamp(x, LO, HI))
    return tirx.Select(x > c(HI), c(float("inf")), tirx.Select(x < c(LO), c(0.0), y))


def _exp_in_range(xc: tirx.PrimExpr) -> tirx.PrimExpr:
    """exp(xc) for xc in [LO, HI]."""
    c = lambda v: _const(v, xc)     # noqa: E731
    lanes = xc.ty.dtype.lanes
    i32 = "int32" if lanes == 1 else f"int32x{lanes}"
    # n rounded by adding 1.5 * 2^23, whose float has ulp 1 (|n| < 2^22): t's low mantissa bits are the integer
    # n, read by reinterpreting t, with no float-to-int conversion (LLVM leaves that undefined for NaN, which
    # the clamp lets through). NOTE: needs IEEE arithmetic: a target with LLVM's fast-math may fold t - ROUNDER
    # to the unrounded product
    t = xc * c(LOG2E) + c(ROUNDER)
    n = t - c(ROUNDER)
    r = xc - n * c(LN2_HI) - n * c(LN2_LO)
    p = c(P[0])
    for coef in P[1:]:
        p = p * r + c(coef)
    er = p * (r * r) + r + c(1.0)
    # 2^n from its exponent bits, as 2^(n - n // 2) * 2^(n // 2): n runs from -126 to 128, one factor alone
    # would leave the normal range at the top
    def i32c(v):
        return tirx.IntImm("int32", v) if lanes == 1 else tirx.Broadcast(tirx.IntImm("int32", v), lanes)

    def pow2(k):
        return tirx.reinterpret(str(xc.ty.dtype), tirx.shift_left(k + i32c(127), i32c(23)))
    ni = tirx.reinterpret(i32, t) - tirx.reinterpret(i32, c(ROUNDER))
    half = tirx.shift_right(ni, i32c(1))
    return er * pow2(ni - half) * pow2(half)


def _is_f32(x) -> bool:
    """float32, scalar or vector (other types keep TVM's own lowering)."""
    return x.ty.dtype.type_code == 2 and x.ty.dtype.bits == 32


def _lower_exp(op):
    x = op.args[0]
    return exp_f32(x) if _is_f32(x) else op


def _lower_sigmoid(op):
    x = op.args[0]
    if not _is_f32(x):
        return op
    # exp(-x) held below 2^127 (the sigmoid is then below 1e-38 anyway), so 1 + exp(-x) stays finite
    e = _exp_in_range(clamp(-x, LO, 88.0))
    return _const(1.0, x) / (_const(1.0, x) + e)


register_intrin_lowering("tirx.exp", "llvm", f=_lower_exp, level=LEVEL)
register_intrin_lowering("tirx.sigmoid", "llvm", f=_lower_sigmoid, level=LEVEL)
