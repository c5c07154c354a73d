"""Global average pooling (mean over H and W) in NCHW{c}c or NCHW: one channel vector per step.

Applies to `relax.mean` over the two spatial axes of a 4-D (NCHW) or 5-D (NCHW{c}c) tensor.
"""
from __future__ import annotations

from tvm import s_tir, te, tirx

from schedules.rule import KERNEL_ATTR, Scheduled, ScheduleRule, finish_tile, kernel_block, tile_in_registers

KIND = "mean_hw"


def mean_hw(data: te.Tensor, keepdims: bool) -> te.Tensor:
    """Mean over axes 2 and 3."""
    shape = [int(v) for v in data.shape]
    h, w = shape[2], shape[3]
    rh = te.reduce_axis((0, h), "rh")
    rw = te.reduce_axis((0, w), "rw")
    blocked = len(shape) == 5
    out_shape = shape[:2] + ([1, 1] if keepdims else []) + (shape[4:] if blocked else [])

    def index(*i):
        lane = [i[-1]] if blocked else []
        return (i[0], i[1], rh, rw, *lane)

    total = te.compute(out_shape, lambda *i: te.sum(data[index(*i)], axis=[rh, rw]), name="sum_hw",
                       attrs={KERNEL_ATTR: KIND})
    scale = tirx.const(1.0 / (h * w), data.dtype)
    return te.compute(out_shape, lambda *i: total[i] * scale, name="mean_hw")


class MeanHW(ScheduleRule):
    """Global average pooling, vectorised over the channel lanes, parallel over channel blocks."""

    kind = KIND

    def apply(self, func, spec, knobs=None):
        sch = s_tir.Schedule(func)
        block, _ = kernel_block(sch, KIND)
        if block is None:
            return None
        loops = sch.get_loops(block)
        spatial, (rh, rw) = loops[:-2], loops[-2:]
        blocked = int(sch.get(spatial[-1]).extent) > 1 and len(spatial) in (3, 5)
        if blocked:
            lane = spatial[-1]
            sch.reorder(*spatial[:-1], rh, rw, lane)
        wb, left = tile_in_registers(sch, block, spatial[1])
        if blocked:
            sch.vectorize(lane)
        finish_tile(sch, block, wb, rh, left, spec.vector_lanes)
        return Scheduled(sch.mod["main"], "f32_mean_hw" + ("_nchwc" if blocked else "_nchw"), {})
