"""Global average pooling (mean over H and W) in NCHW{c}c or NCHW.

Applies to `relax.mean` over the two spatial axes of a 4-D (NCHW) or 5-D (NCHW{c}c) tensor.
NCHW{c}c: one channel vector per step, summed over the pixels. NCHW (a CHW region's squeeze-and-
excitation): each channel's plane is contiguous, so it is summed a vector of pixels at a time (the last
pixels with a masked load) and the vector's lanes added at the end; parallel over channels.
"""
from __future__ import annotations

from tvm import s_tir, te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as I

from schedules.chw_rows import lanes_inside
from schedules.rule import KERNEL_ATTR, Scheduled, ScheduleRule, finish_tile, kernel_block, tile_in_registers, \
    top_blocks

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
        data, out = list(func.params) if len(func.params) == 2 else (None, None)   # the mean alone, NCHW
        if data is not None and len(data.shape) == 4 and int(data.shape[0]) == 1 and str(data.dtype) == "float32" \
                and len(top_blocks(sch)) == 2:
            planes = mean_planes(data, out, spec.vector_lanes).with_attrs(func.attrs).with_attr("op_pattern", 8)
            return Scheduled(planes, "f32_mean_hw_chw", {})
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


def mean_planes(data, out, lanes: int) -> tirx.PrimFunc:
    """out = the mean of each channel plane of data [1, C, H, W] (out: any shape of C floats)."""
    _, c, h, w = (int(d) for d in data.shape)
    hw = h * w
    nv, tail = divmod(hw, lanes)
    f32 = "float32"
    with IRBuilder() as ib:
        with I.prim_func():
            I.func_name("mean")
            I.func_attr({"tirx.noalias": True})
            x = I.arg("x", I.buffer(data.shape, f32))
            o = I.arg("out", I.buffer(out.shape, f32))
            with I.sblock("root"):   # NOTE: the body is one root block, as TVM's analyses expect
                planes = I.decl_buffer((c, hw), f32, data=x.data)
                means = I.decl_buffer((c,), f32, data=o.data)
                with I.parallel(0, c) as ch:
                    acc = I.alloc_buffer((lanes,), f32, scope="global")
                    whole = tirx.Ramp(0, 1, lanes)
                    I.buffer_store(acc, tirx.Broadcast(tirx.FloatImm(f32, 0.0), lanes), [whole])
                    if nv:
                        with I.serial(0, nv) as v:
                            I.buffer_store(acc, tirx.BufferLoad(acc, [whole])
                                           + tirx.BufferLoad(planes, [ch, tirx.Ramp(v * lanes, 1, lanes)]), [whole])
                    if tail:   # the masked lanes of the last load are undefined: selected out
                        mask = lanes_inside(0, 1, lanes, tail)
                        last = tirx.call_intrin(f"float32x{lanes}", "tirx.masked_load", planes, ch,
                                                tirx.Ramp(nv * lanes, 1, lanes), mask)
                        I.buffer_store(acc, tirx.BufferLoad(acc, [whole]) + tirx.Select(
                            mask, last, tirx.Broadcast(tirx.FloatImm(f32, 0.0), lanes)), [whole])
                    total = tirx.BufferLoad(acc, [0])
                    for i in range(1, lanes):
                        total = total + tirx.BufferLoad(acc, [i])
                    I.buffer_store(means, total * tirx.FloatImm(f32, 1.0 / hw), [ch])
    return ib.get()
