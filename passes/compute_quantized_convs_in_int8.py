"""ComputeQuantizedConvsInInt8: a 1x1 conv reading a quantize step, its weights on an int8 grid, sums in int32.

A fully connected layer at batch 1 (matmul of [1, K] by constant [K, N]) is the same conv on one pixel.

QuantizeStepsInFloat leaves a quantized model's activations as float steps, A * s2 with A a whole number in
[lo, hi] (hi - lo <= 255), and folding leaves each conv's dequantized weights as a per-output-channel step
times an integer in [-128, 127]. Such a conv is the same sum in integers:

    conv(A * s2, W)  =>  (float(conv_int32(uint8(A - lo), Wq) + lo * sum_ci Wq) * (s2 * step))

A dynamically quantized model's conv reads A - z instead (compiler/frontend/onnx_integer_ops.py: z a whole
number computed at run time, s2 = 1): the same, minus z * step * sum_ci Wq after.

where conv_int32 runs on AVX-512 VNNI (schedules/u8i8_conv2d_nchwc.py: four times the multiply-adds of an fp32
FMA an instruction); the int32 sums are exact, so the only rounding is the final float scale's. The uint8
input is one more elementwise step fused into the producer of A; other readers of A * s2 keep the float copy.
Skipped, with a log line: weights not on an integer grid (a float model), kxk / strided-padded / grouped
convs (1x1 only so far), inputs not from a quantize step.
NOTE: runs after ConvertToBlockedLayout (NCHW16c tensors, OHWI16o weights) and only on targets with
`int8_dot == "avx512_vnni"`.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, const, const_np, is_const, op_name, rewrite_main, rewriter, \
    scalar_value, shape_of

NAME = "ComputeQuantizedConvsInInt8"
GRID_TOLERANCE = 1e-3   # |w / step - round(w / step)| allowed (float32 rounding of a folded scale: ~1e-5)
WEIGHT_MAX = 127        # int8 weights: [-128, 127]
LANES = 16


def _row_steps(x: np.ndarray, extent: np.ndarray, largest: int, top: int | None = None) -> np.ndarray | None:
    """Per row of x [O, I]: extent / m for the largest m <= `largest` that puts the row's x * m / extent within
    GRID_TOLERANCE of whole numbers (none above `top`, where given); 0 where extent is 0; None if a row fits no m."""
    step = np.zeros(len(x))
    todo = extent > 0
    for m in range(largest, 0, -1):
        if not todo.any():
            break
        rows = np.flatnonzero(todo)
        r = x[rows] * (m / extent[rows, None])
        fit = np.abs(r - np.rint(r)).max(axis=1) <= GRID_TOLERANCE
        if top is not None:
            fit &= np.rint(r).max(axis=1) <= top
        step[rows[fit]] = extent[rows[fit]] / m
        todo[rows[fit]] = False
    return None if todo.any() else step


def _whole(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    """x / step rounded per row (0 on rows of step 0)."""
    return np.rint(np.divide(x, step[:, None], out=np.zeros_like(x), where=step[:, None] > 0))


def integer_grid(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(q int8 [O, I], step float64 [O]) with w == q * step[:, None] for every row of w [O, I], each row's step its
    largest |w| / m for the largest m <= 128 that puts the row on the grid within [-128, 127]; None if some row is
    on none."""
    w = w.astype(np.float64)
    step = _row_steps(w, np.abs(w).max(axis=1), WEIGHT_MAX + 1, top=WEIGHT_MAX)
    return None if step is None else (_whole(w, step).astype(np.int8), step)


def offset_grid(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(q int8 [O, I], step float64 [O], offset float64 [O], used bool [I]) with w == q * step[:, None] + offset[:, None]
    on the used columns (those non-zero in some row; q is 0 on the others), or None if some row is on no such grid.
    Asymmetric uint8 weights (TFLite's TF1 quantization, ONNX Runtime's QUInt8) are s * (Q - zero point): each row
    spans at most 255 steps, but not around 0, so integer_grid finds no int8 grid for the rows that reach past 127
    steps on one side; shifted by the row's own offset they fit [-128, 127]."""
    w = w.astype(np.float64)
    used = np.any(w != 0, axis=0)
    wu = w[:, used]
    if wu.size == 0:
        return None
    vmin = wu.min(axis=1)
    step = _row_steps(wu - vmin[:, None], wu.max(axis=1) - vmin, 2 * WEIGHT_MAX + 1)
    if step is None:
        return None
    q = np.zeros(w.shape)
    q[:, used] = _whole(wu - vmin[:, None], step) - (WEIGHT_MAX + 1)
    q[step == 0] = 0
    return q.astype(np.int8), step, vmin + (WEIGHT_MAX + 1) * step, used


def weight_grid(w: np.ndarray):
    """integer_grid's (q, step), else offset_grid's (q, step, offset, used), else None."""
    return integer_grid(w) or offset_grid(w)


def _lanes_const(v: np.ndarray, dtype: str) -> relax.Expr:
    """A per-output-channel vector of a blocked conv's padded channels as [1, O/16, 1, 1, 16]."""
    return const(np.ascontiguousarray(v.astype(dtype).reshape(1, -1, 1, 1, LANES)))


@rewriter
class _Int8(BindingRewriter):
    # conv2d(multiply(A, s2), W)  =>  multiply(astype(add(conv2d_int32(astype(add(A, -lo), u8), Wq), corr)), scale)
    # conv2d(subtract(A, z), W)   =>  the same with s2 = 1, + multiply(z, -scale * sum Wq)
    def __init__(self, mod, func):
        super().__init__(mod, func)
        self.u8: dict = {}      # (A, lo) -> its uint8 copy
        self.sums: dict = {}    # (uint8 copy, used channels, strides) -> its pixel_sums

    def whole_steps(self, x):
        """(A, s2, lo, z) when x = (A - z) * s2, A a whole number in [lo, lo + 255], else None. Static steps:
        x = A * s2, A = clip(round(.)) [+ c], z None; dynamic ones (compiler/frontend/onnx_integer_ops.py):
        x = A - z, A = clip(round(.) + z, 0, 255), z = round(.) a scalar computed at run time, s2 = 1.
        A classifier's input [1, K] may be such a step flattened (a reshape, after the layout transform of a
        blocked [1, K/16, 1, 1, 16] back to NCHW): A is then the step before them, whose channel order is K's."""
        found = self.producer(x)
        if op_name(found) == "relax.reshape" and len(shape_of(x)) == 2:
            return self.whole_steps(self.unflattened(found.args[0]))
        if op_name(found) == "relax.subtract":
            a, z = found.args
            if is_const(z) or shape_of(z) not in ([], [1]) \
                    or op_name(self.producer(z)) != "relax.round":
                return None
            bounds = self.whole_range(a)
            return (a, 1.0, bounds[0], z) if bounds else None
        if op_name(found) != "relax.multiply":
            return None
        a, s2 = found.args
        scale = scalar_value(s2)
        if scale is None:
            a, scale = s2, scalar_value(a)
        if scale is None or is_const(a):
            return None
        made = self.producer(a)
        shift = scalar_value(made.args[1]) if op_name(made) == "relax.add" else None
        clip = a if shift is None else made.args[0]
        shift = shift or 0.0
        bounds = self.whole_range(clip)
        return (a, scale, bounds[0] + int(shift), None) if bounds and shift == np.rint(shift) else None

    def unflattened(self, x):
        """x's blocked source where x = to_nchw(blocked) of a 1 x 1 plane without padding channels (the same values
        in the same order), else x."""
        made = self.producer(x)
        if op_name(made) != "relax.layout_transform" or shape_of(x)[2:] != [1, 1]:
            return x
        src = made.args[0]
        shape = shape_of(src)
        if len(shape) != 5 or shape[2:4] != [1, 1] or shape[1] * shape[4] != shape_of(x)[1]:
            return x
        block = min(1, shape[1] - 1)                          # lane 2 of block 1 is channel 18 (16 lanes a block)
        mapped = [int(v) for v in made.attrs.index_map.map_indices([0, block, 0, 0, 2])]
        return src if mapped == [0, block * shape[4] + 2, 0, 0] else x

    def whole_range(self, a) -> tuple[int, int] | None:
        """(lo, hi) of a = clip(round(.) [+ whole scalar], lo, hi) with whole bounds at most 255 apart, else None."""
        clip = self.producer(a)
        if op_name(clip) != "relax.clip":
            return None
        inner = self.producer(clip.args[0])
        if op_name(inner) == "relax.add":
            rest = [self.producer(v) for v in inner.args]
            if not all(op_name(r) == "relax.round" for r in rest) \
                    or any(shape_of(v) not in ([], [1]) for v in inner.args[1:]):
                return None
        elif op_name(inner) != "relax.round":
            return None
        lo, hi = float(clip.args[1].value), float(clip.args[2].value)
        if lo != np.rint(lo) or hi != np.rint(hi) or not 0 <= hi - lo <= 255:
            return None
        return int(lo), int(hi)

    def rewrite(self, var, value):
        if op_name(value) == "relax.matmul" and var.ty.dtype == "float32":
            return self.matmul(var, value)
        if op_name(value) != "relax.nn.conv2d" or var.ty.dtype != "float32":
            return None
        a, (x, w) = value.attrs, value.args
        if not (str(a.data_layout) == f"NCHW{LANES}c" and str(a.kernel_layout) == f"OHWI{LANES}o"
                and str(a.out_layout) == f"NCHW{LANES}c" and is_const(w)):
            return None
        step = self.whole_steps(x)
        if step is None:
            return None
        wv = const_np(w)
        if wv.shape[1:3] != (1, 1) or int(a.groups) != 1 or any(int(p) for p in a.padding) \
                or any(int(d) != 1 for d in a.dilation):
            changelog.skip(NAME, var.name, "kept float: int8 convs are 1x1, ungrouped, unpadded so far")
            return None
        ob, _, _, cin, _ = wv.shape
        grid = weight_grid(wv[:, 0, 0].transpose(0, 2, 1).reshape(ob * LANES, cin))
        if grid is None:
            changelog.skip(NAME, var.name, "kept float: its weights are not an integer grid times a channel step")
            return None
        changelog.record(NAME, "int8" if len(grid) == 2 else "int8_offset", var.name)
        return self.int8_conv(grid, *step, a.strides)

    def int8_conv(self, grid, a, s2: float, lo: int, z, strides):
        """The float result of a 1x1 conv of (A - z) * s2 (A blocked NCHW16c, or a classifier's [1, K] or [1, K, 1, 1]
        read as [1, K/16, 1, 1, 16]) with the weights grid (q [O, I], step): conv_int32(uint8(A - lo), q),
        + lo * sum q, as float, * s2 * step, - z * s2 * sum w.
        An offset grid (q, step, offset, used: w = q * step + offset on the used input channels) adds
        s2 * offset * S, S = sum of A over the used channels at each output pixel (one int32 sum per pixel, shared
        by every output channel)."""
        u = self.uint8(a, lo)
        if len(shape_of(u)) != 5:       # a classifier's [1, K] (or its [1, K, 1, 1] before a flatten)
            u = self.emit(relax.op.reshape(u, [1, int(np.prod(shape_of(u))) // LANES, 1, 1, LANES]))
        q, wstep = grid[:2]
        cout, cin = q.shape
        sum_q = q.astype(np.int64).sum(axis=1)
        sum_w = wstep * sum_q
        qk = np.ascontiguousarray(q.reshape(cout // LANES, LANES, cin).transpose(0, 2, 1)[:, None, None])
        acc = self.emit(relax.op.nn.conv2d(u, const(qk), strides=strides, data_layout=f"NCHW{LANES}c",
                                           kernel_layout=f"OHWI{LANES}o", out_layout=f"NCHW{LANES}c",
                                           out_dtype="int32"), "conv_int8")
        acc = self.emit(relax.op.add(acc, _lanes_const(lo * sum_q, "int32")))
        y = relax.op.multiply(self.emit(relax.op.astype(acc, "float32")), _lanes_const(s2 * wstep, "float32"))
        if len(grid) == 4:
            offset, used = grid[2:]
            sum_w = sum_w + offset * int(used.sum())
            y = relax.op.add(self.emit(y), self.emit(relax.op.multiply(
                self.emit(relax.op.astype(self.pixel_sums(u, lo, used, strides), "float32")),
                _lanes_const(s2 * offset, "float32"))))
        if z is None:
            return y
        sums = _lanes_const(-s2 * sum_w, "float32")
        return relax.op.add(self.emit(y), self.emit(relax.op.multiply(z, sums)))

    def pixel_sums(self, u, lo: int, used: np.ndarray, strides):
        """[1, 1, H', W', 1] int32: sum over the used channels of uint8(A - lo) + lo, at the conv's output pixels."""
        key = (u, used.tobytes(), tuple(int(v) for v in strides))
        if key not in self.sums:
            x = self.emit(relax.op.astype(u, "int32"))
            if not used.all():      # NOTE: pad lanes of u hold junk (the clip keeps it in uint8): masked out
                x = self.emit(relax.op.multiply(x, _lanes_const(used, "int32")))
            s = self.emit(relax.op.sum(x, axis=[1, 4], keepdims=True))
            if any(int(v) != 1 for v in strides):
                shape = shape_of(s)
                s = self.emit(relax.op.strided_slice(s, axes=[2, 3], begin=[0, 0], end=shape[2:4],
                                                     strides=[int(v) for v in strides]))
            self.sums[key] = self.emit(relax.op.add(s, relax.const(lo * int(used.sum()), "int32")), "pixel_sums")
        return self.sums[key]

    def matmul(self, var, value):
        # matmul(multiply(A, s2), W [K, N])  =>  the same 1x1 int8 conv on one pixel: [1, K] as [1, K/16, 1, 1, 16]
        x, w = value.args
        shape = shape_of(var)
        if not is_const(w) or len(shape) != 2 or shape[0] != 1:
            return None
        wv = const_np(w)
        if wv.ndim != 2:
            return None
        k, n = wv.shape
        step = self.whole_steps(x)
        if step is None or k % LANES:
            return None
        npad = -(-n // LANES) * LANES
        grid = weight_grid(np.pad(wv.T, ((0, npad - n), (0, 0))))
        if grid is None:
            changelog.skip(NAME, var.name, "kept float: its weights are not an integer grid times a channel step")
            return None
        y = self.emit(relax.op.reshape(self.emit(self.int8_conv(grid, *step, [1, 1])), [1, npad]))
        changelog.record(NAME, "int8_matmul", var.name)
        return relax.op.strided_slice(y, axes=[1], begin=[0], end=[n]) if npad != n else y

    def uint8(self, steps, lo: int):
        if (steps, lo) not in self.u8:
            # NOTE: the clip keeps padding channels' lanes (another shift there, or junk) inside uint8
            shifted = self.emit(relax.op.clip(self.emit(relax.op.add(steps, relax.const(float(-lo), "float32"))),
                                              0, 255))
            self.u8[(steps, lo)] = self.emit(relax.op.astype(shifted, "uint8"), "to_uint8")
        return self.u8[(steps, lo)]


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class ComputeQuantizedConvsInInt8:
    """A 1x1 conv reading a quantize step, its weights on an int8 grid, sums in int32."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _Int8)[0]
