"""Import an ONNX model into Relax: validate it, pin shapes, and fix what TVM's importer gets wrong."""
from __future__ import annotations

import contextlib
import io
import os
import re
import warnings

import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _tvm_onnx

from compiler.errors import ShrinkcError
from compiler.frontend.model_info import QUANTIZED_VERIFY_TOLERANCE, ModelInfo, TensorInfo, batch_one
from compiler.frontend.onnx_float16 import has_float16, widen_float16
from compiler.frontend.onnx_fold_shapes import fold_shape_subgraphs
from compiler.frontend.onnx_integer_ops import has_integer_ops, integer_ops_in_float
from compiler.frontend.onnx_ops import TVM_CONVERT_MAP, convert_map
from compiler.frontend.onnx_qdq_types import has_unreadable_qdq, readable_qdq
from compiler.frontend.onnx_qoperators import has_qoperators, qoperators_to_qdq
from compiler.native_log import released

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "float64", 9: "bool"}


def _check_external_data(model: onnx.ModelProto, path: str) -> None:
    """The files a model keeps its weights in (ONNX external data: exporters write large models so) are there."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    here = os.path.dirname(os.path.abspath(path))
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if uses_external_data(tensor):
            location = ExternalDataInfo(tensor).location
            if not os.path.isfile(os.path.join(here, location)):
                raise ShrinkcError(f"'{path}' keeps its weights (tensor '{tensor.name}') in '{location}', which is "
                                   f"not in {here}", f"copy '{location}' next to the model")


def load_onnx(path: str) -> onnx.ModelProto:
    """Read and sanity-check an ONNX file, turning every failure into one clear error."""
    if not os.path.exists(path):
        raise ShrinkcError(f"model file '{path}' does not exist", "check the path")
    if os.path.getsize(path) == 0:
        raise ShrinkcError(f"model file '{path}' is empty", "re-export the model")
    try:
        model = onnx.load(path, load_external_data=False)
        _check_external_data(model, path)
        onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except ShrinkcError:
        raise
    except Exception as err:  # protobuf DecodeError, a truncated external data file, ...
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
    supported = convert_map()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise ShrinkcError(f"custom op '{node.domain}.{node.op_type}' (node '{node.name}') is not supported",
                               "export the model with standard ONNX ops only")
        if node.op_type not in supported and node.op_type not in ("Constant", "If"):
            raise ShrinkcError(f"unsupported op '{node.op_type}' (node '{node.name}')",
                               "replace it with standard ops before export, or open an issue naming the op")


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
    _tvm_onnx._get_convert_map = convert_map
    _tvm_onnx.ONNXGraphImporter._convert_operator = _named_convert_operator
    try:
        yield
    finally:
        _tvm_onnx._get_convert_map = TVM_CONVERT_MAP
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
    if has_unreadable_qdq(model):
        model, rewritten = readable_qdq(model)
        notes.append(f"{rewritten} com.microsoft or int4 QuantizeLinear / DequantizeLinear op(s) (ONNX Runtime's "
                     "quantizer writes them for int4 / int16 types) read as standard ops, dequantized constants folded")
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
    failure = None
    try:
        with _patched_importer(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            mod = _tvm_onnx.from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict,
                                      keep_params_in_input=False)
    except ShrinkcError as err:
        failure = err
    if failure is not None:
        raise released(failure) from None
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
