"""Converters for the ONNX ops TVM's importer gets wrong, slow or not at all, tested against ONNX Runtime
(tests/test_onnx_legacy_ops.py; Clip, Pad and the variadic ops through the compile tests).
compiler/frontend/onnx_import.py puts them in TVM's table while it imports."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _tvm_onnx

from compiler.errors import ShrinkcError

TVM_CONVERT_MAP = _tvm_onnx._get_convert_map


class _Clip(_tvm_onnx.Clip):
    """Clip with constant bounds as one R.clip, so later passes can see ReLU6 (TVM emits max/min TIR)."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        bounds = inputs[1:3] if len(inputs) > 1 else []
        if all(b is None or isinstance(b, tvm.ir.Constant) for b in bounds) and inputs[0].ty.dtype == "float32":
            lo = float(bounds[0].value.numpy()) if len(bounds) > 0 and bounds[0] is not None else -np.inf
            hi = float(bounds[1].value.numpy()) if len(bounds) > 1 and bounds[1] is not None else np.inf
            return relax.op.clip(inputs[0], lo, hi)
        return super()._impl_v13(bb, inputs, attr, params)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return relax.op.clip(inputs[0], float(attr.get("min", -np.inf)), float(attr.get("max", np.inf)))


class _Pad(_tvm_onnx.Pad):
    """Constant-mode Pad as R.nn.pad (TVM emits opaque TIR), so it can be folded into the next conv."""

    @classmethod
    def _lower_pad(cls, bb, inputs, attr, params, allowed_modes):
        if attr.get("mode", b"constant").decode("utf-8") != "constant":
            return super()._lower_pad(bb, inputs, attr, params, allowed_modes)
        before, after, value = cls._parse_pads_and_axes(inputs, params)
        width = [int(v) for pair in zip(before, after) for v in pair]
        return relax.op.nn.pad(inputs[0], width, "constant", float(value))


def _legacy_upsample(bb, x, scales, attr, op: str) -> relax.Expr:
    """Upsample (opsets 7-9) and Resize-10: output size floor(size x scale), input coordinate out / scale
    (asymmetric); nearest rounds it down when enlarging and up when shrinking (what ONNX Runtime does, per axis:
    tests/test_onnx_legacy_ops.py). TVM's Upsample read its scales from the attribute only and rounded to the
    nearest pixel; its Resize had only opset 18's inputs."""
    shape = [int(d) for d in x.ty.shape]
    scales = [float(s) for s in scales]
    if len(shape) != 4 or len(scales) != 4 or scales[:2] != [1.0, 1.0]:
        raise ShrinkcError(f"{op} with scales {scales} of a {len(shape)}-D tensor is not supported",
                           "scale only H and W of an NCHW tensor")
    mode = attr.get("mode", b"nearest").decode("ascii")
    if mode not in ("nearest", "linear"):
        raise ShrinkcError(f"{op} mode '{mode}' is not supported", "use nearest or linear")
    size = [int(d * s) for d, s in zip(shape[2:], scales[2:])]
    exact = all(o == d * s for o, d, s in zip(size, shape[2:], scales[2:]))   # then in / out is 1 / scale
    if exact and (mode == "linear" or (scales[2] >= 1) == (scales[3] >= 1)):
        return relax.op.image.resize2d(x, relax.ShapeExpr(size), layout="NCHW",
                                       method="nearest_neighbor" if mode == "nearest" else "linear",
                                       coordinate_transformation_mode="asymmetric",
                                       rounding_method=("floor" if scales[2] >= 1 else "ceil") if mode == "nearest"
                                       else "round")
    for axis in (2, 3):   # else each axis by its own table of source indices (and weights)
        x = bb.normalize(_resample_axis(x, axis, shape[axis], size[axis - 2], scales[axis], mode))
    return x


def _resample_axis(x, axis: int, in_size: int, out_size: int, scale: float, mode: str) -> relax.Expr:
    """x resampled along `axis` to out_size, output index i reading input coordinate i / scale."""
    coord = np.arange(out_size, dtype=np.float32) / np.float32(scale)
    if mode == "nearest":
        index = np.floor(coord) if scale >= 1 else np.ceil(coord)
        return relax.op.take(x, relax.const(np.clip(index, 0, in_size - 1).astype(np.int64)), axis=axis)
    lo = np.clip(np.floor(coord), 0, in_size - 1)
    hi = np.clip(lo + 1, 0, in_size - 1)
    weight = np.clip(coord, 0, in_size - 1) - lo
    along = [1, 1, 1, 1]
    along[axis] = out_size
    w_hi = relax.const(weight.reshape(along).astype(np.float32))
    w_lo = relax.const((1 - weight).reshape(along).astype(np.float32))
    return relax.op.add(relax.op.multiply(relax.op.take(x, relax.const(lo.astype(np.int64)), axis=axis), w_lo),
                        relax.op.multiply(relax.op.take(x, relax.const(hi.astype(np.int64)), axis=axis), w_hi))


def _constant_values(expr, params, what: str) -> list[float]:
    value = _tvm_onnx.get_constant(expr, params)
    if not isinstance(value, tvm.ir.GenericConst):
        raise ShrinkcError(f"{what} computed at run time are not supported", "make them a constant of the model")
    return value.value.numpy().reshape(-1).tolist()


class _Upsample(_tvm_onnx.Upsample):
    """Upsample of opsets 7 (scales attribute) and 9 (scales input)."""

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        return _legacy_upsample(bb, inputs[0], attr["scales"], attr, "Upsample")

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        return _legacy_upsample(bb, inputs[0], _constant_values(inputs[1], params, "Upsample scales"), attr,
                                "Upsample")


def _resize_shrinks(inputs, params) -> bool:
    """Whether a Resize (opset 11+ inputs) makes some axis smaller (where antialiasing filters), or that is
    unknown."""
    shape = [int(d) for d in inputs[0].ty.shape]
    try:
        if len(inputs) > 3 and inputs[3] is not None:
            sizes = _constant_values(inputs[3], params, "Resize sizes")
            return any(o < d for o, d in zip(sizes, shape[len(shape) - len(sizes):]))
        return any(f < 1 for f in _constant_values(inputs[2], params, "Resize scales"))
    except ShrinkcError:
        return True


class _Resize(_tvm_onnx.Resize):
    """Resize-10 (X, scales) as Upsample; opsets 11-17 with TVM's converter (written for opset 18's inputs, the
    same ones); opset 18's `axes` (scales or sizes for those axes only) widened to every axis first."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        return _legacy_upsample(bb, inputs[0], _constant_values(inputs[1], params, "Resize scales"), attr, "Resize")

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        return cls._impl_v18(bb, inputs, attr, params)

    @classmethod
    def _impl_v18(cls, bb, inputs, attr, params):
        policy = attr.get("keep_aspect_ratio_policy", b"stretch").decode("ascii")
        if policy != "stretch":
            raise ShrinkcError(f"Resize keep_aspect_ratio_policy '{policy}' is not supported",
                               "export the resize with explicit sizes (policy 'stretch')")
        if "axes" in attr:
            shape = [int(d) for d in inputs[0].ty.shape]
            axes = [int(a) % len(shape) for a in attr.pop("axes")]
            inputs = list(inputs)
            for k, fill in ((2, [1.0] * len(shape)), (3, list(shape))):
                if len(inputs) > k and inputs[k] is not None:
                    full = list(fill)
                    for a, v in zip(axes, _constant_values(inputs[k], params, "Resize scales or sizes")):
                        full[a] = v
                    inputs[k] = relax.const(np.array(full, np.float32 if k == 2 else np.int64))
        if int(attr.get("antialias", 0)) and _resize_shrinks(inputs, params):
            raise ShrinkcError("Resize with antialias=1 that shrinks an axis is not supported (TVM's resize would "
                               "ignore the filter and give other numbers)",
                               "export the resize without antialiasing, or resize before the model")
        return super()._impl_v18(bb, inputs, attr, params)


class _ConvTranspose(_tvm_onnx.ConvTranspose):
    """ConvTranspose with `output_shape` (TVM's converter ignored it: the output had the natural size): the pads
    (or, where the output is larger, the output padding) that give that size, split as the ONNX spec says (an odd
    one at the start; at the end for SAME_UPPER), as ONNX Runtime does."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if "output_shape" in attr:
            shape = [int(d) for d in inputs[0].ty.shape]
            out = [int(d) for d in attr.pop("output_shape")][-(len(shape) - 2):]
            dims = len(out)
            kernel = list(attr.get("kernel_shape", [int(d) for d in inputs[1].ty.shape][2:]))
            strides, dilations = attr.get("strides", [1] * dims), attr.get("dilations", [1] * dims)
            extra = list(attr.get("output_padding", [0] * dims))
            upper = attr.pop("auto_pad", b"NOTSET") in (b"SAME_UPPER", "SAME_UPPER")
            begin, end = [], []
            for i in range(dims):
                total = strides[i] * (shape[2 + i] - 1) + extra[i] + (kernel[i] - 1) * dilations[i] + 1 - out[i]
                if total < 0:
                    extra[i] -= total
                    if extra[i] >= strides[i]:
                        raise ShrinkcError(f"ConvTranspose output_shape {out} is larger than its input, kernel and "
                                           "strides can produce", "check the model's output_shape attribute")
                total = max(total, 0)
                begin.append(total // 2 if upper else total - total // 2)
                end.append(total - begin[-1])
            attr["pads"], attr["output_padding"] = begin + end, extra
        return super()._impl_v1(bb, inputs, attr, params)


class _MaxPool(_tvm_onnx.MaxPool):
    """MaxPool with auto_pad SAME_LOWER: output ceil(size / stride) as for SAME_UPPER, the odd pad at the start (TVM's
    converter took floor(size / stride): one row or column short on odd sizes)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if attr.get("auto_pad", b"NOTSET") in (b"SAME_LOWER", "SAME_LOWER"):
            shape = [int(d) for d in inputs[0].ty.shape][2:]
            kernel = list(attr["kernel_shape"])
            strides, dilations = attr.get("strides", [1] * len(shape)), attr.get("dilations", [1] * len(shape))
            total = [max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
                     for size, k, s, d in zip(shape, kernel, strides, dilations)]
            attr["pads"] = [t - t // 2 for t in total] + [t // 2 for t in total]
            attr["auto_pad"] = b"NOTSET"
        return super()._impl_v1(bb, inputs, attr, params)


class _Slice(_tvm_onnx.Slice):
    """Slice of opsets 1-9 (starts, ends, axes as attributes) as the later form with constant inputs."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        consts = [relax.const(np.array(attr[k], np.int64)) if k in attr else None for k in ("starts", "ends", "axes")]
        return cls._impl_v13(bb, [inputs[0], *consts, None], {}, params)

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        return cls._impl_v13(bb, inputs, attr, params)


class _ImageScaler(_tvm_onnx.OnnxOpConverter):
    """ImageScaler (opsets 1-9; tiny YOLOv2 starts with one): x * scale + bias[channel]."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        bias = np.array(attr.get("bias", [0.0]), np.float32).reshape([1, -1] + [1] * (len(x.ty.shape) - 2))
        return relax.op.add(relax.op.multiply(x, relax.const(np.float32(attr.get("scale", 1.0)))), relax.const(bias))


class _LpNormalization(_tvm_onnx.OnnxOpConverter):
    """LpNormalization (p 1 or 2) along an axis: x / sum(|x|^p)^(1/p) (face-embedding models end with one)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, axis, p = inputs[0], int(attr.get("axis", -1)), int(attr.get("p", 2))
        if p not in (1, 2):
            raise ShrinkcError(f"LpNormalization with p={p} is not supported", "use p=1 or p=2")
        norm = relax.op.sum(relax.op.abs(x) if p == 1 else relax.op.multiply(x, x), axis=[axis], keepdims=True)
        return relax.op.divide(x, norm if p == 1 else relax.op.sqrt(norm))


def _pairwise(base):
    """Sum/Mean/Max/Min of tensors as a chain of binary ops (TVM stacks them into a 5-D tensor and
    reduces it: slower, and layout passes cannot see through it). All-constant inputs fold as before."""

    class Pairwise(base):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            if all(isinstance(i, tvm.ir.GenericConst) for i in inputs):
                return super()._impl_v1(bb, inputs, attr, params)
            return cls._impl_dynamic(bb, inputs)

    Pairwise.__name__ = base.__name__
    return Pairwise


def convert_map():
    """TVM's table of op converters with ours in place of the ones above."""
    table = TVM_CONVERT_MAP()
    table["Clip"] = _Clip
    table["Pad"] = _Pad
    table["Upsample"] = _Upsample
    table["ConvTranspose"] = _ConvTranspose
    table["Slice"] = _Slice
    table["MaxPool"] = _MaxPool
    table["ImageScaler"] = _ImageScaler
    table["LpNormalization"] = _LpNormalization
    table["Resize"] = _Resize
    for name in ("Sum", "Mean", "Max", "Min"):
        table[name] = _pairwise(table[name])
    return table
