"""Dense 3x3 stride-1 convolutions in NCHW{c}c by Winograd F(2x2, 3x3): 16 multiplies per 2x2 outputs, not 36.

Applies to `relax.nn.conv2d` with groups == 1, a constant 3x3 kernel, stride 1, no dilation, input
and output NCHW{b}c (the merged DepthShrinker blocks are such convs). Three stages in one kernel:
  V[p, cb, ty, tx, c]  = B^T d B     each 4x4 input tile (2 pixels apart), transformed, per position p
  M[p, ob, ty, tx, o]  = sum_c V[p, c, ty, tx] * U[p, c, o]   16 independent 1x1 convs (the FLOPs)
  out[ob, y, x, o]     = A^T M A     each tile's 2x2 outputs, with the fused bias / residual add
U = G g G^T is computed at compile time (`transform_weights`). The 1x1 stage has the P x OB register
tile of schedules/f32_conv2d_nchwc.py. Knobs: `pixel_tile` (tiles per register tile), `oc_blocks`.
"""
from __future__ import annotations

import numpy as np
from tvm import s_tir, te, tirx

from schedules.f32_conv2d_nchwc import default_register_tile, padded, pixel_tile_loops, register_tile_options
from schedules.rule import KERNEL_ATTR, Scheduled, ScheduleRule, inline_epilogue, kernel_block, kernel_extents, \
    schedule_injective

KIND = "conv2d_winograd_nchwc"
M, R = 2, 3               # outputs per tile side, kernel side
A_ = M + R - 1            # input tile side (4)
# F(2, 3) with interpolation points 0, 1, -1 and infinity (Lavin & Gray 2016): all entries of B and A
# are 0 or +-1, so the transforms are additions only; G has halves, exact in binary.
# NOTE: F(4x4, 3x3) (points 0, +-1, +-2, infinity) was tried: faster still, but on a 224-channel conv its
# error against ONNX Runtime went past the 1e-4 that every lossless rewrite must keep; not used.
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)


def transform_weights(kernel: np.ndarray) -> np.ndarray:
    """OHWI{b}o kernel [cob, 3, 3, cin, bo] -> U [4, 4, cob, cin, bo] = G g G^T per (o, i), in float64."""
    return np.einsum("ai,bj,kijcl->abkcl", G, G, kernel.astype(np.float64)).astype(np.float32)


def _combine(row: np.ndarray, term):
    """sum_i row[i] * term(i) for a row of 0 / +-1 entries, written as additions only."""
    out = None
    for i, coef in enumerate(row):
        if coef == 0:
            continue
        t = term(i)
        out = (t if coef > 0 else -t) if out is None else (out + t if coef > 0 else out - t)
    return out


def _pick(index, options: list):
    """options[index] for a loop index that the schedule unrolls (the selects fold to one branch)."""
    out = options[-1]
    for k in range(len(options) - 2, -1, -1):
        out = tirx.Select(index == k, options[k], out)
    return out


def conv2d_winograd_nchwc(data: te.Tensor, u: te.Tensor, padding) -> te.Tensor:
    """out[n, ob, y, x, o] = the 3x3 stride-1 conv of `data` (NCHW{bi}c) with the kernel whose
    transform is `u` [4, 4, cob, cin, bo]; `padding` = top, left, bottom, right."""
    n, cib, h, w, bi = (int(v) for v in data.shape)
    _, _, cob, cin, bo = (int(v) for v in u.shape)
    top, left, bottom, right = (int(v) for v in padding)
    oh, ow = h + top + bottom - R + 1, w + left + right - R + 1
    nty, ntx = -(-oh // M), -(-ow // M)
    # pad to whole tiles: the last tile of an odd-sized output reads one more row / column of zeros
    src = padded(data, [top, left, bottom + nty * M - oh, right + ntx * M - ow])

    def v_value(b, py, px, c, ty, tx, ci):
        def col(i):
            return _pick(px, [_combine(BT[k], lambda j: src[b, c, ty * M + i, tx * M + j, ci]) for k in range(A_)])
        return _pick(py, [_combine(BT[k], col) for k in range(A_)])

    v = te.compute((n, A_, A_, cib, nty, ntx, bi), v_value, name="winograd_in")
    ci = te.reduce_axis((0, cin), "ci")
    m = te.compute(
        (n, A_, A_, cob, nty, ntx, bo),
        lambda b, py, px, ob, ty, tx, o: te.sum(v[b, py, px, ci // bi, ty, tx, ci % bi] * u[py, px, ob, ci, o],
                                                axis=[ci]),
        name="winograd_gemm",
        attrs={KERNEL_ATTR: KIND, "in_block": bi, "pad": [top, left, bottom, right]},
    )

    def out_value(b, ob, y, x, o):
        dy, dx, ty, tx = y % M, x % M, y // M, x // M

        def row(i):
            return _pick(dx, [_combine(AT[k], lambda j: m[b, i, j, ob, ty, tx, o]) for k in range(M)])
        return _pick(dy, [_combine(AT[k], row) for k in range(M)])

    return te.compute((n, cob, oh, ow, bo), out_value, name="winograd_out")


class Conv2dWinogradNCHWc(ScheduleRule):
    """Winograd F(2x2, 3x3) convolutions in NCHW{c}c: transforms vectorised over channels, a P x OB 1x1 tile."""

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

        # stage 1: input transform, one 4x4 tile of one channel block per step, positions unrolled
        (v_block,) = sch.get_producers(gemm)
        for pad in sch.get_producers(v_block):
            sch.compute_inline(pad)
        vn, vpy, vpx, vc, vty, vtx, vci = sch.get_loops(v_block)
        sch.reorder(vn, vc, vty, vtx, vpy, vpx, vci)
        sch.parallel(sch.fuse(vn, vc, vty))
        sch.unroll(vpy)
        sch.unroll(vpx)
        sch.vectorize(vci)

        # stage 2: 16 1x1 convs, a register tile of P tiles x OB channel blocks
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

        # stage 3: output transform with the fused epilogue, 2x2 outputs of a tile per step
        (out_block,) = [c for c in sch.get_consumers(tile)]
        for c in inline_epilogue(sch, out_block):
            schedule_injective(sch, c, lanes)
        on, oob, oy, ox, oo = sch.get_loops(out_block)
        oty, ody = sch.split(oy, [None, M])
        otx, odx = sch.split(ox, [None, M])
        sch.reorder(on, oob, oty, otx, ody, odx, oo)
        sch.parallel(sch.fuse(on, oob, oty))
        sch.unroll(ody)
        sch.unroll(odx)
        sch.vectorize(oo)
        name = f"f32_conv3x3_winograd2x2_nchw{bo}c_{k['pixel_tile']}x{k['oc_blocks'] * bo}"
        return Scheduled(sch.mod["main"], name, k)
