"""Which kernel computes each op (legalization) and which rules schedule kernels, in the order tried."""
from __future__ import annotations

import re

import tvm
from tvm import relax, topi

from schedules import f32_batch_matmul as batch
from schedules.f32_conv2d_nchwc import Conv2dNCHWc, conv2d_nchwc
from schedules.f32_conv2d_winograd_nchwc import Conv2dWinogradNCHWc
from schedules.f32_dense import Dense, dense, pack_weights
from schedules.f32_dwconv2d_nchwc import DwConv2dNCHWc, dwconv2d_nchwc
from schedules.f32_fallback import Fallback
from schedules.f32_pool_nchwc import MeanHW, mean_hw
from schedules import f32_resize2d_nchw as resize
from schedules import f32_softmax as softmax
from schedules.meta_schedule_trace import MetaScheduleTrace
from schedules.rule import static_shape
from schedules.u8i8_conv2d_nchwc import U8I8Conv2dNCHWc, conv2d_u8i8_nchwc, pack_vnni

# Tried in order on every fused PrimFunc; the first that applies wins. Fallback always applies.
# MetaScheduleTrace applies only to kernels a tuning database has a MetaSchedule trace for.
CPU_RULES = [MetaScheduleTrace(), Conv2dNCHWc(), U8I8Conv2dNCHWc(), Conv2dWinogradNCHWc(), DwConv2dNCHWc(), MeanHW(),
             Dense(), batch.BatchMatmul(), softmax.SoftmaxRows(), resize.Resize2dNCHW(), Fallback()]


def _legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr | None:
    a = call.attrs
    if call.args[0].ty.dtype == "uint8" and call.ty.dtype == "int32":   # passes/compute_quantized_convs_in_int8.py
        u = relax.const(pack_vnni(call.args[1].value.numpy()))
        return bb.call_te(conv2d_u8i8_nchwc, call.args[0], u, strides=a.strides, primfunc_name_hint="conv2d")
    if str(a.kernel_layout).startswith("OHWI") and str(a.out_layout).startswith("NCHW") \
            and len(str(a.out_layout)) > 4 and call.ty.dtype == "float32":
        groups = int(a.groups)
        args = dict(strides=a.strides, padding=a.padding, dilation=a.dilation)
        if groups == 1 or int(call.args[1].ty.shape.values[3]) > 1:    # dense, or groups of whole channel blocks
            return bb.call_te(conv2d_nchwc, call.args[0], call.args[1], **args, groups=groups,
                              primfunc_name_hint="conv2d")
        if str(a.data_layout) == str(a.out_layout):
            return bb.call_te(dwconv2d_nchwc, call.args[0], call.args[1], **args, primfunc_name_hint="dwconv2d")
    return None


def _legalize_mean(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr | None:
    x = call.args[0]
    ndim = len(x.ty.shape.values)
    axes = sorted(int(v) % ndim for v in call.attrs.axis) if call.attrs.axis is not None else []
    if ndim in (4, 5) and axes == [2, 3] and x.ty.dtype == "float32":
        return bb.call_te(mean_hw, x, bool(call.attrs.keepdims), primfunc_name_hint="mean")
    return None


def _legalize_matmul(bb: relax.BlockBuilder, call: relax.Call, lanes: int) -> relax.Expr | None:
    x, w = call.args
    if isinstance(w, tvm.ir.Constant) and len(w.ty.shape.values) == 2 and len(x.ty.shape.values) == 2 \
            and call.ty.dtype == "float32":
        n = int(w.ty.shape.values[1])
        wp = relax.const(pack_weights(w.value.numpy(), min(8 * lanes, -(-n // lanes) * lanes)))
        out = bb.call_te(dense, x, wp, primfunc_name_hint="dense")
        if int(wp.ty.shape.values[0]) * int(wp.ty.shape.values[2]) != n:
            out = bb.normalize(relax.op.strided_slice(out, axes=[1], begin=[0], end=[n]))
        return out
    shapes = [static_shape(t) for t in (x, w)]
    if not isinstance(w, tvm.ir.Constant) and None not in shapes and batch.applies(*shapes) \
            and x.ty.dtype == w.ty.dtype == call.ty.dtype == "float32":
        return bb.call_te(batch.batch_matmul, x, w, primfunc_name_hint="batch_matmul")
    return None


def _legalize_resize2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr | None:
    """Bilinear resize of a static float32 NCHW or NCHW{b}c tensor: schedules/f32_resize2d_nchw.py (separable)."""
    a, x = call.attrs, call.args[0]
    shapes = [static_shape(t) for t in (x, call)]
    layout = str(a.layout)
    rank = 4 if layout == "NCHW" else 5 if re.fullmatch(r"NCHW\d+c", layout) else 0
    if not rank or str(a.method) != "linear" or x.ty.dtype != "float32" \
            or call.ty.dtype != "float32" or str(a.coordinate_transformation_mode) not in resize.MODES \
            or any(s is None or len(s) != rank for s in shapes):
        return None
    (ih, iw), (oh, ow) = (s[2:4] for s in shapes)
    consts = [relax.const(t) for t in resize.tables((ih, iw), (oh, ow), str(a.coordinate_transformation_mode))]
    return bb.call_te(resize.resize2d_linear_nchw, x, *consts, primfunc_name_hint="resize2d")


def _legalize_erf(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr | None:
    """float32 erf (GELU as torch exports it) as TVM's rational approximation (topi.fast_erf: vector arithmetic,
    within 4e-7 of the true value over the whole range, tests/test_pointwise_matmuls_to_convs.py); TVM's own lowering
    called libm's erff once per lane (a large part of ConvNeXt-T's time in an ad-hoc per-kernel profile)."""
    if call.args[0].ty.dtype != "float32":
        return None
    return bb.call_te(topi.fast_erf, call.args[0], primfunc_name_hint="erf")


def _legalize_softmax(bb: relax.BlockBuilder, call: relax.Call, lanes: int) -> relax.Expr | None:
    """float32 softmax along the last axis of a static tensor: schedules/f32_softmax.py."""
    x = call.args[0]
    shape = static_shape(x)
    if shape is None or len(shape) < 2 or x.ty.dtype != "float32":
        return None
    if int(call.attrs.axis) % len(shape) != len(shape) - 1:
        return None
    return bb.call_te(softmax.softmax_rows, x, lanes, primfunc_name_hint="softmax")


def _with_default(ours, op_name):
    """Use our kernel where it applies, else TVM's own legalization."""
    default = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def legalize(bb, call):
        out = ours(bb, call)
        return out if out is not None else default(bb, call)
    return legalize


def cpu_legalize_map(lanes: int) -> dict:
    """Our kernels for the ops they serve (convs that passes/compute_convs_by_winograd.py made Winograd kernels
    are calls of those already)."""
    return {
        "relax.nn.conv2d": _with_default(_legalize_conv2d, "relax.nn.conv2d"),
        "relax.mean": _with_default(_legalize_mean, "relax.mean"),
        "relax.matmul": _with_default(lambda bb, call: _legalize_matmul(bb, call, lanes), "relax.matmul"),
        "relax.image.resize2d": _with_default(_legalize_resize2d, "relax.image.resize2d"),
        "relax.erf": _with_default(_legalize_erf, "relax.erf"),
        "relax.nn.softmax": _with_default(lambda bb, call: _legalize_softmax(bb, call, lanes), "relax.nn.softmax"),
    }
