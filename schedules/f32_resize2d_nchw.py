"""Bilinear 2-D resize in NCHW or NCHW{b}c, separable: every input row interpolated along W, then two such rows per
output row.

TVM's own resize (topi) computes each output pixel from four input pixels whose indices and weights it
works out per lane, so every load is a gather: in a torch.onnx LRASPP MobileNetV3-Large the two resizes
took a large part of the time (ad-hoc per-kernel profile). Bilinear interpolation is separable, and
topi's order of operations already is: top = a (1 - fx) + b fx, bottom = c (1 - fx) + d fx,
out = top (1 - fy) + bottom fy. So `resize_w` computes t = the W-interpolation of every input row
([N, C, IH, OW]) and `resize_h` blends the rows lo[oy] and hi[oy] of t with weight fy[oy]: the same
operations in the same order (the weights computed here in numpy, as topi computes them, may differ from its in
the last bit). Its inner loop reads two rows of t contiguously (whole vectors, the row
fixed for the loop); only `resize_w` gathers, over the input's IH rows (when upsampling, OH / IH times
fewer than the output has). The source columns, rows and weights are constants computed here the way
topi computes its coordinates (half_pixel, pytorch_half_pixel, align_corners, asymmetric).
Blocked (NCHW{b}c: ConvertToBlockedLayout keeps a resize between convs blocked, so no layout transforms
sit around it), every pixel's b channels share their source pixels and weights: each load is a whole vector,
none gathers.
"""
from __future__ import annotations

import numpy as np
from tvm import s_tir, te

from schedules.rule import KERNEL_ATTR, MIN_PARALLEL, Scheduled, ScheduleRule, inline_epilogue, inline_producers

KIND = "resize2d_linear_nchw"
MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")


def source_coordinates(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """The input coordinate each output index reads (float32, as topi's get_inx computes it)."""
    x = np.arange(out_size, dtype=np.float32)
    scale = np.float32(in_size / out_size)
    if mode == "align_corners":
        return (x * np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.zeros_like(x))
    if mode == "asymmetric":
        return x * scale
    if mode == "pytorch_half_pixel" and out_size <= 1:
        return np.zeros_like(x)
    return (x + np.float32(0.5)) * scale - np.float32(0.5)          # half_pixel


def axis_table(in_size: int, out_size: int, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, f) per output index: the two input indices (clamped to the input) and the weight of hi."""
    coord = source_coordinates(in_size, out_size, mode)
    base = np.floor(coord)
    f = (coord - base).astype(np.float32)
    lo = np.clip(base, 0, in_size - 1).astype(np.int32)
    hi = np.clip(base + 1, 0, in_size - 1).astype(np.int32)
    return lo, hi, f


def resize2d_linear_nchw(data: te.Tensor, lo_w: te.Tensor, hi_w: te.Tensor, fw: te.Tensor, lo_h: te.Tensor,
                         hi_h: te.Tensor, fh: te.Tensor) -> te.Tensor:
    """data [N, C, IH, IW] or blocked [N, C/b, IH, IW, b] -> [N, C, OH, OW] (or blocked); the tables as axis_table
    gives them (OW and OH entries)."""
    shape = [int(d) for d in data.shape]
    ow, oh = int(lo_w.shape[0]), int(lo_h.shape[0])
    one = te.const(1.0, "float32")
    rows = te.compute((*shape[:3], ow, *shape[4:]), lambda b, k, y, x, *lane: data[(b, k, y, lo_w[x], *lane)]
                      * (one - fw[x]) + data[(b, k, y, hi_w[x], *lane)] * fw[x], name="resize_w")
    return te.compute((*shape[:2], oh, ow, *shape[4:]), lambda b, k, y, x, *lane: rows[(b, k, lo_h[y], x, *lane)]
                      * (one - fh[y]) + rows[(b, k, hi_h[y], x, *lane)] * fh[y], name="resize_h",
                      attrs={KERNEL_ATTR: KIND})


def tables(in_hw: tuple[int, int], out_hw: tuple[int, int], mode: str) -> list[np.ndarray]:
    """[lo_w, hi_w, fw, lo_h, hi_h, fh]: resize2d_linear_nchw's constant arguments."""
    return [*axis_table(in_hw[1], out_hw[1], mode), *axis_table(in_hw[0], out_hw[0], mode)]


class Resize2dNCHW(ScheduleRule):
    """Both stages parallel over rows, vectorised along W; producers (a slice) and the epilogue inlined."""

    kind = KIND

    def apply(self, func, spec, knobs=None):
        if (found := self.kernel(func)) is None:
            return None
        sch, block, _ = found
        rows = sch.get_sblock("resize_w")
        inline_epilogue(sch, block)
        inline_producers(sch, rows)
        for b in (rows, block):
            _rows_in_vectors(sch, b, spec.vector_lanes)
        out = sch.get(block).writes[0].source.shape
        layout = "nchw" if len(out) == 4 else f"nchw{int(out[4])}c"
        return Scheduled(sch.mod["main"], f"f32_resize2d_linear_{layout}", {})


def _rows_in_vectors(sch: s_tir.Schedule, block, lanes: int) -> None:
    """NCHW: (N, C, H) fused and parallel, each row in vectors of the widest power of two up to `lanes` that
    divides its width (a vector never spans two rows, whose row index and weight differ). NCHW{b}c: the
    pixels fused and parallel, each pixel's b channels one vector (b <= lanes)."""
    *outer, x = sch.get_loops(block)
    width, v = int(sch.get(x).extent), lanes
    while width % v:
        v //= 2
    fused = sch.fuse(*outer)
    if v > 1:
        sch.vectorize(x if v == width else sch.split(x, [None, v])[1])
    if int(sch.get(fused).extent) * width >= MIN_PARALLEL:
        sch.parallel(fused)
