"""Depthwise kxk convolutions in NCHW{c}c: each channel vector slides over a row tile of pixels.

Applies to `relax.nn.conv2d` with groups == channels, kernel OHWI{b}o ([C/b, KH, KW, 1, b]) and
input/output NCHW{b}c. Padding is inlined as a guarded load. Knob: `pixel_tile` (output pixels
along a row held in registers); `knob_space` lists the tiles `shrinkc tune` times.
"""
from __future__ import annotations

from tvm import s_tir, te

from schedules.f32_conv2d_nchwc import TILE_SLACK, accumulator_budget, padded, pixel_tile_loops, row_tile, \
    row_tile_options
from schedules.rule import KERNEL_ATTR, Scheduled, ScheduleRule, finish_tile, inline_producers, kernel_block, \
    kernel_extents, tile_in_registers

KIND = "dwconv2d_nchwc"


def dwconv2d_nchwc(data: te.Tensor, kernel: te.Tensor, strides, padding, dilation) -> te.Tensor:
    """out[n, cb, y, x, c] = sum_{kh, kw} in[n, cb, y*s+kh*d, x*s+kw*d, c] * k[cb, kh, kw, 0, c]."""
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    n, cb, h, w, b = (int(v) for v in data.shape)
    _, kh_, kw_, _, _ = (int(v) for v in kernel.shape)
    top, left, bottom, right = (int(v) for v in padding)
    oh = (h + top + bottom - dh * (kh_ - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw_ - 1) - 1) // sw + 1
    src = padded(data, [top, left, bottom, right])
    kh = te.reduce_axis((0, kh_), "kh")
    kw = te.reduce_axis((0, kw_), "kw")
    return te.compute(
        (n, cb, oh, ow, b),
        lambda i, c, y, x, v: te.sum(src[i, c, y * sh + kh * dh, x * sw + kw * dw, v] * kernel[c, kh, kw, 0, v],
                                     axis=[kh, kw]),
        name="dwconv",
        attrs={KERNEL_ATTR: KIND, "kh": kh_, "kw": kw_, "stride": sh, "pad": [top, left, bottom, right]},
    )


class DwConv2dNCHWc(ScheduleRule):
    """Depthwise kxk convolutions in NCHW{c}c with a row tile of pixels in registers."""

    kind = KIND

    def default_knobs(self, info: dict, spec) -> dict:
        budget = accumulator_budget(info["b"], spec)
        return {"pixel_tile": row_tile(info["oh"], info["ow"], min(8, budget)),
                **spec.kernel_defaults.get(KIND, {})}

    def knob_space(self, func, spec):
        if (found := kernel_extents(func, KIND)) is None:
            return []
        (_, _, oh, ow, b, *_), _ = found
        limit = TILE_SLACK * accumulator_budget(b, spec)
        return [{"pixel_tile": p} for p in row_tile_options(oh, ow) if p <= limit]

    def apply(self, func, spec, knobs=None):
        sch = s_tir.Schedule(func)
        conv, ann = kernel_block(sch, KIND)
        if conv is None:
            return None
        n, c, y, x, v, kh, kw = sch.get_loops(conv)
        b, oh, ow = int(sch.get(v).extent), int(sch.get(y).extent), int(sch.get(x).extent)
        k = {**self.default_knobs({"b": b, "oh": oh, "ow": ow}, spec), **(knobs or {})}
        inline_producers(sch, conv)
        outer, x_i = pixel_tile_loops(sch, y, x, ow, k["pixel_tile"])
        sch.reorder(n, c, *outer, kh, kw, x_i, v)
        wb, left = tile_in_registers(sch, conv, outer[-1])
        sch.parallel(sch.fuse(n, c, *outer[:-1]))
        sch.unroll(kh)
        sch.unroll(kw)
        sch.unroll(x_i)
        sch.vectorize(v)
        finish_tile(sch, conv, wb, kh, left, spec.vector_lanes)
        name = f"f32_dwconv{ann['kh']}x{ann['kw']}s{ann['stride']}_nchw{b}c_{k['pixel_tile']}"
        return Scheduled(sch.mod["main"], name, k)
