"""Dense 3x3 and 5x5 stride-1 convolutions in NCHW{c}c by Winograd: F(2x2, 3x3) (16 multiplies per 2x2 outputs,
not 36) and F(4x4, 5x5) (64 per 4x4 outputs, not 400).

Applies to `relax.nn.conv2d` with groups == 1, a constant 3x3 or 5x5 kernel, stride 1, no dilation, input
and output NCHW{b}c (the merged DepthShrinker blocks are such convs). Three stages in one kernel, with
A = M + R - 1 the input tile side (4 for F(2, 3), 8 for F(4, 5)):
  V[p, cb, ty, tx, c]  = B^T d B     each A x A input tile (M pixels apart), transformed, per position p
  M[p, ob, ty, tx, o]  = sum_c V[p, c, ty, tx] * U[p, c, o]   A^2 independent 1x1 convs (the FLOPs)
  out[ob, y, x, o]     = A^T M A     each tile's M x M outputs, with the fused bias / residual add
U = G g G^T is computed at compile time (`transform_weights`). The 1x1 stage has the P x OB register
tile of schedules/f32_conv2d_nchwc.py. Knobs: `pixel_tile` (tiles per register tile), `oc_blocks`.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from tvm import s_tir, te, tirx

from schedules.f32_conv2d_nchwc import default_register_tile, padded, pixel_tile_loops, register_tile_options
from schedules.rule import KERNEL_ATTR, Scheduled, ScheduleRule, inline_epilogue, kernel_block, kernel_extents, \
    schedule_injective

KIND = "conv2d_winograd_nchwc"


@dataclass(frozen=True)
class Transform:
    """F(m, r): `at` [m, n], `g` [n, r], `bt` [n, n] with n = m + r - 1, so that the valid correlation of n
    inputs d with r taps g is at @ ((g @ taps) * (bt @ d))."""
    m: int
    r: int
    at: np.ndarray
    g: np.ndarray
    bt: np.ndarray

    @property
    def n(self) -> int:
        return self.m + self.r - 1


def _inverse(rows: list[list[Fraction]]) -> list[list[Fraction]]:
    """The exact inverse of a square matrix of fractions (Gauss-Jordan)."""
    n = len(rows)
    a = [list(r) + [Fraction(int(i == j)) for j in range(n)] for i, r in enumerate(rows)]
    for c in range(n):
        p = next(i for i in range(c, n) if a[i][c] != 0)
        a[c], a[p] = a[p], a[c]
        a[c] = [v / a[c][c] for v in a[c]]
        for i in range(n):
            if i != c and a[i][c] != 0:
                a[i] = [x - a[i][c] * y for x, y in zip(a[i], a[c])]
    return [r[n:] for r in a]


def cook_toom(m: int, r: int, points) -> Transform:
    """F(m, r) from the n - 1 finite interpolation `points` and infinity, exactly: a linear convolution of m
    and r coefficients evaluated at the points and interpolated back (Toom-Cook), transposed into the
    correlation. Each row of B^T is scaled so its smallest entry is +-1 and G takes the inverse scale."""
    n = m + r - 1
    pts = [Fraction(p) for p in points]
    assert len(pts) == n - 1 and len(set(pts)) == n - 1

    def evaluate(k):   # a polynomial with k coefficients at each point; its leading coefficient at infinity
        return [[p ** i for i in range(k)] for p in pts] + [[Fraction(0)] * (k - 1) + [Fraction(1)]]

    vinv = _inverse(evaluate(n))
    bt = [[vinv[i][j] for i in range(n)] for j in range(n)]
    g = evaluate(r)
    for j in range(n):
        s = min(abs(x) for x in bt[j] if x != 0)
        bt[j], g[j] = [x / s for x in bt[j]], [x * s for x in g[j]]
    at = [[row[i] for row in evaluate(m)] for i in range(m)]
    return Transform(m, r, *(np.array(x, dtype=np.float64) for x in (at, g, bt)))


# F(2, 3) with interpolation points 0, 1, -1 and infinity (Lavin & Gray 2016): all entries of B and A
# are 0 or +-1, so the transforms are additions only; G has halves, exact in binary.
# NOTE: F(4x4, 3x3) (points 0, +-1, +-2, infinity) was tried: faster still, but on a 224-channel conv its
# error against ONNX Runtime went past the 1e-4 that every lossless rewrite must keep; not used.
F2_3 = Transform(2, 3, at=np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64),
                 g=np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=np.float64),
                 bt=np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64))
# F(4, 5) with points 0, +-1, +-2, +-1/2 and infinity: 4 multiplies per output of a 5x5 conv instead of 25.
F4_5 = cook_toom(4, 5, (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2)))
TRANSFORMS = {3: F2_3, 5: F4_5}         # by kernel side
BY_TILE = {t.n: t for t in TRANSFORMS.values()}   # by input tile side (the transformed kernel's first axis)


def transform_weights(kernel: np.ndarray) -> np.ndarray:
    """OHWI{b}o kernel [cob, R, R, cin, bo] -> U [A, A, cob, cin, bo] = G g G^T per (o, i), in float64."""
    g = TRANSFORMS[kernel.shape[1]].g
    return np.einsum("ai,bj,kijcl->abkcl", g, g, kernel.astype(np.float64)).astype(np.float32)


def _combine(row: np.ndarray, term):
    """sum_i row[i] * term(i): entries +-1 as additions, others as multiply-adds, zeros skipped."""
    out = None
    for i, coef in enumerate(row):
        if coef == 0:
            continue
        t = term(i)
        if abs(coef) != 1:
            t, coef = t * tirx.const(abs(float(coef)), "float32"), np.sign(coef)
        out = (t if coef > 0 else -t) if out is None else (out + t if coef > 0 else out - t)
    return out


def _pick(index, options: list):
    """options[index] for a loop index that the schedule unrolls (the selects fold to one branch)."""
    out = options[-1]
    for k in range(len(options) - 2, -1, -1):
        out = tirx.Select(index == k, options[k], out)
    return out


def conv2d_winograd_nchwc(data: te.Tensor, u: te.Tensor, padding) -> te.Tensor:
    """out[n, ob, y, x, o] = the R x R stride-1 conv of `data` (NCHW{bi}c) with the kernel whose
    transform is `u` [A, A, cob, cin, bo] (A = 4: 3x3, A = 8: 5x5); `padding` = top, left, bottom, right."""
    n, cib, h, w, bi = (int(v) for v in data.shape)
    a_, _, cob, cin, bo = (int(v) for v in u.shape)
    f = BY_TILE[a_]
    M, R, BT, AT = f.m, f.r, f.bt, f.at
    top, left, bottom, right = (int(v) for v in padding)
    oh, ow = h + top + bottom - R + 1, w + left + right - R + 1
    nty, ntx = -(-oh // M), -(-ow // M)
    # pad to whole tiles: the last tile of an odd-sized output reads one more row / column of zeros
    src = padded(data, [top, left, bottom + nty * M - oh, right + ntx * M - ow])

    # B^T d B in two passes, the rows (B^T d) first: one expression per position of the tile, each a sum of
    # A terms (written as one expression of A^2 terms, F(4x4, 5x5)'s unrolled kernel did not finish compiling
    # within minutes)
    rows = te.compute((n, cib, nty, ntx, a_, a_, bi), lambda b, c, ty, tx, py, j, ci: _pick(
        py, [_combine(BT[k], lambda i: src[b, c, ty * M + i, tx * M + j, ci]) for k in range(a_)]),
        name="winograd_in_rows")

    def v_value(b, py, px, c, ty, tx, ci):
        return _pick(px, [_combine(BT[k], lambda j: rows[b, c, ty, tx, py, j, ci]) for k in range(a_)])

    v = te.compute((n, a_, a_, cib, nty, ntx, bi), v_value, name="winograd_in")
    ci = te.reduce_axis((0, cin), "ci")
    m = te.compute(
        (n, a_, a_, cob, nty, ntx, bo),
        lambda b, py, px, ob, ty, tx, o: te.sum(v[b, py, px, ci // bi, ty, tx, ci % bi] * u[py, px, ob, ci, o],
                                                axis=[ci]),
        name="winograd_gemm",
        attrs={KERNEL_ATTR: KIND, "in_block": bi, "pad": [top, left, bottom, right]},
    )

    # A^T M A in two passes, the rows (A^T M) first
    out_rows = te.compute((n, cob, nty, ntx, M, a_, bo), lambda b, ob, ty, tx, dy, j, o: _pick(
        dy, [_combine(AT[k], lambda i: m[b, i, j, ob, ty, tx, o]) for k in range(M)]), name="winograd_out_rows")

    def out_value(b, ob, y, x, o):
        return _pick(x % M, [_combine(AT[k], lambda j: out_rows[b, ob, y // M, x // M, y % M, j, o])
                             for k in range(M)])

    return te.compute((n, cob, oh, ow, bo), out_value, name="winograd_out")


class Conv2dWinogradNCHWc(ScheduleRule):
    """Winograd convolutions in NCHW{c}c: transforms vectorised over channels, a P x OB 1x1 tile."""

    kind = KIND

    def default_knobs(self, info: dict, spec) -> dict:
        p, ob = default_register_tile(info["nty"], info["ntx"], info["cob"], info["bo"], spec)
        return {"pixel_tile": p, "oc_blocks": ob, **spec.kernel_defaults.get(KIND, {})}

    def knob_space(self, func, spec):
        if (found := kernel_extents(func, KIND)) is None:
            return []
        (_, _, _, cob, nty, ntx, bo, *_), _ = found
        return [{"pixel_tile": p, "oc_blocks": ob} for p, ob in register_tile_options(nty, ntx, cob, bo, spec)]

    def apply(self, func, spec, knobs=None):
        sch = s_tir.Schedule(func)
        gemm, ann = kernel_block(sch, KIND)
        if gemm is None:
            return None
        lanes = spec.vector_lanes
        n, py, px, ob, ty, tx, o, ci = sch.get_loops(gemm)
        _, _, _, cob, nty, ntx, bo = (int(sch.get(lp).extent) for lp in (n, py, px, ob, ty, tx, o))
        k = {**self.default_knobs({"nty": nty, "ntx": ntx, "cob": cob, "bo": bo}, spec), **(knobs or {})}

        f = BY_TILE[int(sch.get(py).extent)]
        # stage 1: input transform, one A x A tile of one channel block per step (its rows, then its
        # columns), positions unrolled
        (v_block,) = sch.get_producers(gemm)
        (rows,) = sch.get_producers(v_block)
        for pad in sch.get_producers(rows):
            sch.compute_inline(pad)
        vn, vpy, vpx, vc, vty, vtx, vci = sch.get_loops(v_block)
        sch.reorder(vn, vc, vty, vtx, vpy, vpx, vci)
        sch.parallel(sch.fuse(vn, vc, vty))
        sch.unroll(vpy)
        sch.unroll(vpx)
        sch.vectorize(vci)
        sch.compute_at(rows, vtx)
        *_, rpy, rj, rci = sch.get_loops(rows)
        sch.unroll(rpy)
        sch.unroll(rj)
        sch.vectorize(rci)

        # stage 2: A^2 1x1 convs, a register tile of P tiles x OB channel blocks
        ob_o, ob_i = sch.split(ob, [None, k["oc_blocks"]])
        outer, pix = pixel_tile_loops(sch, ty, tx, ntx, k["pixel_tile"])
        ci_o, ci_i = sch.split(ci, [None, ann["in_block"]])
        sch.unroll(ci_i)
        sch.reorder(n, py, px, ob_o, *outer, ci_o, ci_i, ob_i, pix, o)
        tile = sch.cache_write(gemm, 0, "global")
        sch.reverse_compute_at(tile, outer[-1])
        sch.parallel(sch.fuse(n, py, px, ob_o, *outer))
        sch.unroll(ob_i)
        sch.unroll(pix)
        sch.vectorize(o)
        sch.vectorize(sch.get_loops(tile)[-1])
        sch.decompose_reduction(gemm, ci_o)

        # stage 3: output transform (rows, then columns) with the fused epilogue, M x M outputs of a tile per step
        (out_rows,) = sch.get_consumers(tile)
        (out_block,) = sch.get_consumers(out_rows)
        for c in inline_epilogue(sch, out_block):
            schedule_injective(sch, c, lanes)
        on, oob, oy, ox, oo = sch.get_loops(out_block)
        oty, ody = sch.split(oy, [None, f.m])
        otx, odx = sch.split(ox, [None, f.m])
        sch.reorder(on, oob, oty, otx, ody, odx, oo)
        sch.parallel(sch.fuse(on, oob, oty))
        sch.unroll(ody)
        sch.unroll(odx)
        sch.vectorize(oo)
        sch.compute_at(out_rows, otx)
        *_, rdy, rj, ro = sch.get_loops(out_rows)
        sch.unroll(rdy)
        sch.unroll(rj)
        sch.vectorize(ro)
        name = f"f32_conv{f.r}x{f.r}_winograd{f.m}x{f.m}_nchw{bo}c_{k['pixel_tile']}x{k['oc_blocks'] * bo}"
        return Scheduled(sch.mod["main"], name, k)
