"""Import an ONNX model into Relax: validate it, pin shapes, and fix what TVM's importer gets wrong."""
from __future__ import annotations

import contextlib
import io
import os
import re
import warnings

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _tvm_onnx

from compiler.errors import ShrinkcError
from compiler.frontend.model_info import QUANTIZED_VERIFY_TOLERANCE, ModelInfo, TensorInfo, batch_one
from compiler.frontend.onnx_float16 import has_float16, widen_float16
from compiler.frontend.onnx_fold_shapes import fold_shape_subgraphs
from compiler.frontend.onnx_integer_ops import has_integer_ops, integer_ops_in_float
from compiler.frontend.onnx_qoperators import has_qoperators, qoperators_to_qdq

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "float64", 9: "bool"}


def load_onnx(path: str) -> onnx.ModelProto:
    """Read and sanity-check an ONNX file, turning every failure into one clear error."""
    if not os.path.exists(path):
        raise ShrinkcError(f"model file '{path}' does not exist", "check the path")
    if os.path.getsize(path) == 0:
        raise ShrinkcError(f"model file '{path}' is empty", "re-export the model")
    try:
        model = onnx.load(path, load_external_data=True)
    except Exception as err:  # protobuf DecodeError, missing external data, ...
        raise ShrinkcError(f"'{path}' is not a readable ONNX model ({type(err).__name__}: {err})",
                           "re-export the model; the file may be truncated or not ONNX") from None
    if model.ir_version < 3 or not model.graph.node or not model.graph.output:
        raise ShrinkcError(f"'{path}' is not a valid ONNX model (no graph, outputs or IR version)",
                           "re-export the model; the file may be truncated or not ONNX")
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        if "is required but missing" not in first:  # exporters often leave output shapes out
            raise ShrinkcError(f"'{path}' fails the ONNX checker: {first}",
                               "re-export the model with a recent exporter") from None
    return model


def parse_input_pins(pins: list[str] | None) -> dict[str, list[int]]:
    """Parse `--input NAME:1x3x224x224` pins into {name: shape}."""
    out: dict[str, list[int]] = {}
    for pin in pins or []:
        m = re.fullmatch(r"(.+):(\d+(?:x\d+)*)", pin.strip())
        if not m:
            raise ShrinkcError(f"cannot read --input '{pin}'", "write it as NAME:1x3x224x224")
        out[m.group(1)] = [int(d) for d in m.group(2).split("x")]
    return out


def graph_inputs(model: onnx.ModelProto, pins: dict[str, list[int]], notes: list[str]) -> list[TensorInfo]:
    """The real inputs (not initializers) with every dimension fixed (a free batch axis alone: 1, said in
    `notes`), or an error naming the free one."""
    inits = {i.name for i in model.graph.initializer}
    result = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = _ONNX_DTYPES.get(tt.elem_type, "float32")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                for d in tt.shape.dim]
        if vi.name in pins:
            pinned = pins[vi.name]
            if len(pinned) != len(dims):
                raise ShrinkcError(f"--input {vi.name} has {len(pinned)} dimensions but the model's input "
                                   f"has {len(dims)} ({'x'.join(map(str, dims))})",
                                   f"pin all {len(dims)} dimensions")
            for axis, (d, p) in enumerate(zip(dims, pinned)):
                if isinstance(d, int) and d != p:
                    example = "x".join(str(x) if isinstance(x, int) else "1" for x in dims)
                    raise ShrinkcError(f"--input {vi.name} sets axis {axis} to {p}, but the model fixes it at {d}",
                                       f"pin {vi.name} as {example}")
            dims = pinned
        dims, note = batch_one(vi.name, dims)
        if note:
            notes.append(note)
        free = [d for d in dims if not isinstance(d, int)]
        if free:
            example = "x".join(str(d) if isinstance(d, int) else "1" for d in dims)
            raise ShrinkcError(f"input '{vi.name}' has a dynamic dimension '{free[0]}'",
                               f"pin it with --input {vi.name}:{example}")
        result.append(TensorInfo(vi.name, dims, dtype))
    unknown = set(pins) - {t.name for t in result}
    if unknown:
        raise ShrinkcError(f"--input names '{sorted(unknown)[0]}', which is not an input of the model",
                           f"the inputs are: {', '.join(t.name for t in result)}")
    return result


def _check_ops(model: onnx.ModelProto) -> None:
    supported = _convert_map()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise ShrinkcError(f"custom op '{node.domain}.{node.op_type}' (node '{node.name}') is not supported",
                               "export the model with standard ONNX ops only")
        if node.op_type not in supported and node.op_type not in ("Constant", "If"):
            raise ShrinkcError(f"unsupported op '{node.op_type}' (node '{node.name}')",
                               "replace it with standard ops before export, or open an issue naming the op")


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
        if int(attr.get("antialias", 0)) and _resize_shrinks(inputs, params):
            raise ShrinkcError("Resize with antialias=1 that shrinks an axis is not supported (TVM's resize would "
                               "ignore the filter and give other numbers)",
                               "export the resize without antialiasing, or resize before the model")
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


def _convert_map():
    table = _ORIGINAL_CONVERT_MAP()
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


_ORIGINAL_CONVERT_MAP = _tvm_onnx._get_convert_map
_ORIGINAL_CONVERT_OPERATOR = _tvm_onnx.ONNXGraphImporter._convert_operator


def _named_convert_operator(self, op_name, inputs, attrs, opset):
    """Emit each converted node under its ONNX name, so reports can name layers; name failures."""
    node_name = attrs.get("tvm_custom", {}).get("name", "") or op_name
    try:
        sym = _ORIGINAL_CONVERT_OPERATOR(self, op_name, inputs, attrs, opset)
    except ShrinkcError:
        raise
    except Exception as err:
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ShrinkcError(f"cannot import op '{op_name}' (node '{node_name}'): {msg[:200]}",
                           "check the node's attributes and shapes, or open an issue naming the op") from None
    if isinstance(sym, relax.Call) and isinstance(sym.ty, relax.TensorType):
        sym = self.bb.emit(sym, name_hint=_sanitize(node_name))
    return sym


def _sanitize(name: str) -> str:
    s = re.sub(r"[^0-9a-zA-Z_]", "_", name)
    return s if s and not s[0].isdigit() else "n_" + s


@contextlib.contextmanager
def _patched_importer():
    _tvm_onnx._get_convert_map = _convert_map
    _tvm_onnx.ONNXGraphImporter._convert_operator = _named_convert_operator
    try:
        yield
    finally:
        _tvm_onnx._get_convert_map = _ORIGINAL_CONVERT_MAP
        _tvm_onnx.ONNXGraphImporter._convert_operator = _ORIGINAL_CONVERT_OPERATOR


def import_onnx(source: "str | onnx.ModelProto", pins: dict[str, list[int]] | None = None
                ) -> tuple[tvm.IRModule, ModelInfo]:
    """ONNX file (or ModelProto) -> (Relax module with weights as constants, the model's signature)."""
    if isinstance(source, onnx.ModelProto):
        model, path = source, "<in-memory ONNX model>"
    else:
        model, path = load_onnx(source), os.path.abspath(source)
    notes: list[str] = []
    inputs = graph_inputs(model, pins or {}, notes)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    model, _ = fold_shape_subgraphs(folded, {t.name: t.shape for t in inputs})
    if has_float16(model):
        borders = any(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
                      for v in [*model.graph.input, *model.graph.output])
        model = widen_float16(model)
        notes.append("a float16 model: computed in float32" + (", its float16 inputs and outputs kept" if borders
                                                               else " (its inputs and outputs are float32)"))
    if has_qoperators(model):
        model, rewritten = qoperators_to_qdq(model)
        if rewritten:
            notes.append(f"QOperator format: {rewritten} QLinearConv / QLinear* op(s) read as their float op between "
                         "DequantizeLinear and QuantizeLinear (QDQ form)")
    integer_ops = 0
    if has_integer_ops(model):
        model, integer_ops = integer_ops_in_float(model)
        if integer_ops:
            notes.append(f"dynamically quantized: {integer_ops} ConvInteger / MatMulInteger op(s) and the "
                         "DynamicQuantizeLinear steps before them computed as float32 ops of the same values (a "
                         "different float summation order can move a rounding by one step, so --verify allows a "
                         f"relative difference of {QUANTIZED_VERIFY_TOLERANCE:g})")
    _check_ops(model)
    inits = {t.name for t in model.graph.initializer}
    quantized = sum(n.op_type == "QuantizeLinear" and n.input[0] not in inits for n in model.graph.node)
    if quantized:
        notes.append(f"quantized activations: {quantized} QuantizeLinear step(s), computed in float32, "
                     "1x1 convs reading them in int32 where the CPU has AVX-512 VNNI (a different summation order "
                     "moves single values by one int8 step, so --verify allows a relative "
                     f"difference of {QUANTIZED_VERIFY_TOLERANCE:g})")
    shape_dict = {t.name: t.shape for t in inputs}
    dtype_dict = {t.name: t.dtype for t in inputs}
    with _patched_importer(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        mod = _tvm_onnx.from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict,
                                  keep_params_in_input=False)
    ret = mod["main"].ret_ty
    fields = ret.fields if isinstance(ret, relax.TupleType) else [ret]
    outputs = []
    for vi, ty in zip(model.graph.output, fields):
        if not isinstance(ty, relax.TensorType) or ty.shape is None or any(
                not isinstance(d, tvm.tirx.IntImm) for d in ty.shape.values):
            raise ShrinkcError(f"output '{vi.name}' has a shape that depends on the data",
                               "shrinkc serves static shapes only; pin every input with --input")
        outputs.append(TensorInfo(vi.name, [int(d) for d in ty.shape.values], str(ty.dtype)))
    return mod, ModelInfo("onnx", path, inputs, outputs, notes,
                          verify_tolerance=QUANTIZED_VERIFY_TOLERANCE if quantized or integer_ops else 0.0)
