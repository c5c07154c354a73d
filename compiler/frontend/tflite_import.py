"""Import a TFLite model into Relax: validate it, pin shapes, and rebuild the sparse, fp16 and int8 (dynamic-range)
weights TVM trips on."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import warnings

import numpy as np
import tflite
import tvm
from tflite.BuiltinOperator import BuiltinOperator
from tflite.DimensionType import DimensionType
from tflite.SparseIndexVector import SparseIndexVector
from tflite.TensorType import TensorType
from tvm import relax, te, tirx
from tvm.relax.frontend.tflite import tflite_frontend as _tvm_tflite

from compiler.errors import ShrinkcError
from compiler.frontend import tflite_mediapipe_geometry as geometry
from compiler.frontend.dequantize import dequantize
from compiler.frontend.model_info import QUANTIZED_VERIFY_TOLERANCE, ModelInfo, TensorInfo, batch_one
from compiler.native_log import released
from passes.rewriting import resize2d_like

HINTS_ATTR = "shrinkc_sparse_hints"   # IRModule attribute: {weight tensor name: JSON of its sparse layout}
_DTYPES = {TensorType.FLOAT32: "float32", TensorType.FLOAT16: "float16", TensorType.INT8: "int8",
           TensorType.UINT8: "uint8", TensorType.INT16: "int16", TensorType.INT32: "int32",
           TensorType.INT64: "int64", TensorType.BOOL: "bool"}
_OP_NAMES = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
_LAYOUTS = {"CONV_2D": "OHWI", "DEPTHWISE_CONV_2D": "1HWO", "FULLY_CONNECTED": "OI"}
_CORRUPT_FIX = "re-convert the model; the file may be truncated or not TFLite"


# ---- reading and checking the file ---------------------------------------------------------------
def load_tflite(path: str) -> tuple[bytes, tflite.Model]:
    """Read and sanity-check a .tflite file, turning every failure into one clear error."""
    if not os.path.exists(path):
        raise ShrinkcError(f"model file '{path}' does not exist", "check the path")
    if os.path.getsize(path) == 0:
        raise ShrinkcError(f"model file '{path}' is empty", "re-convert the model")
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8 or raw[4:8] != b"TFL3":
        raise ShrinkcError(f"'{path}' is not a TFLite model (no 'TFL3' flatbuffer identifier)",
                           "pass a .tflite file written by the TFLite converter; for ONNX use a .onnx file")
    model = tflite.Model.GetRootAsModel(raw, 0)
    try:
        _validate(model, raw)
    except ShrinkcError:
        raise
    except Exception as err:  # out-of-range reads in a cut or damaged flatbuffer
        raise ShrinkcError(f"'{path}' is a truncated or damaged TFLite model (reading it failed: {err})",
                           _CORRUPT_FIX) from None
    return raw, model


def _validate(model: tflite.Model, raw: bytes) -> None:
    """Touch every table the importer reads, so a cut file fails here and not deep inside TVM."""
    if model.SubgraphsLength() < 1:
        raise ShrinkcError("the TFLite model has no subgraph", _CORRUPT_FIX)
    nbuf, ncodes = model.BuffersLength(), model.OperatorCodesLength()
    sg = model.Subgraphs(0)
    nt = sg.TensorsLength()
    if 4 * (nbuf + ncodes + nt + sg.OperatorsLength() + model.SubgraphsLength()) > len(raw):
        raise ValueError("its tables claim more entries than the file can hold")
    for i in range(nbuf):
        buf = model.Buffers(i)
        if buf.Offset() > 1 and buf.Offset() + buf.Size() > len(raw):
            raise ShrinkcError(f"buffer {i} lies past the end of the file", _CORRUPT_FIX)
        if buf.DataLength():
            buf.DataAsNumpy()
    for i in range(ncodes):
        code = model.OperatorCodes(i)
        code.BuiltinCode(), code.DeprecatedBuiltinCode(), code.CustomCode()
    for i in range(nt):
        t = sg.Tensors(i)
        t.Name().decode("utf-8"), t.Type(), t.ShapeAsNumpy(), t.ShapeSignatureAsNumpy()
        if t.Buffer() >= nbuf:
            raise ShrinkcError(f"tensor {i} names buffer {t.Buffer()} of {nbuf}", _CORRUPT_FIX)
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        ids = list(op.InputsAsNumpy() if op.InputsLength() else []) + list(
            op.OutputsAsNumpy() if op.OutputsLength() else [])
        if op.OpcodeIndex() >= ncodes or any(j < -1 or j >= nt for j in ids):
            raise ShrinkcError(f"operator {i} refers to a missing op code or tensor", _CORRUPT_FIX)
    ios = list(sg.InputsAsNumpy() if sg.InputsLength() else []) + list(
        sg.OutputsAsNumpy() if sg.OutputsLength() else [])
    if not sg.OutputsLength() or any(j < 0 or j >= nt for j in ios):
        raise ShrinkcError("the subgraph's inputs or outputs are missing or out of range", _CORRUPT_FIX)


def _name(sg, idx: int) -> str:
    return sg.Tensors(int(idx)).Name().decode("utf-8")


def op_name(model: tflite.Model, op) -> str:
    """'CONV_2D', or 'CUSTOM:<name>' for a custom op."""
    code = model.OperatorCodes(op.OpcodeIndex())
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    if builtin == BuiltinOperator.CUSTOM:
        return "CUSTOM:" + (code.CustomCode() or b"?").decode("utf-8", "replace")
    return _OP_NAMES.get(builtin, f"BUILTIN_{builtin}")


# custom ops that shrinkc converts and LiteRT runs (the reference of --verify): an SSD detector's box decoding and NMS
# (TFLite's own op resolver registers it), and MediaPipe's transposed conv with bias that its segmentation models
# upsample with (LiteRT's XNNPACK delegate runs it)
TRANSPOSE_CONV_BIAS = "Convolution2DTransposeBias"
# and MediaPipe's max pooling that also gives where each maximum was, and the unpooling that puts values back there
# (its hair segmentation model's encoder and decoder; LiteRT's XNNPACK delegate runs both, windows as large as their
# stride, no padding)
MAX_POOL_ARGMAX, MAX_UNPOOL = "MaxPoolingWithArgmax2D", "MaxUnpooling2D"
# and the geometry ops of MediaPipe's attention face mesh and its resampler (tflite_mediapipe_geometry; LiteRT cannot
# run these, so --verify cannot check them)
LANDMARKS_TO_MATRIX, TRANSFORM_TENSOR, TRANSFORM_LANDMARKS, RESAMPLER = \
    "Landmarks2TransformMatrix", "TransformTensorBilinear", "TransformLandmarks", "Resampler"
_MEDIAPIPE_OPS = (TRANSPOSE_CONV_BIAS, MAX_POOL_ARGMAX, MAX_UNPOOL, LANDMARKS_TO_MATRIX, TRANSFORM_TENSOR,
                  TRANSFORM_LANDMARKS, RESAMPLER)    # converted by _Converter, by these names
_CUSTOM_OPS = ("TFLite_Detection_PostProcess",) + _MEDIAPIPE_OPS


def _check_custom_ops(model: tflite.Model, path: str) -> None:
    sg = model.Subgraphs(0)
    found: dict[str, str] = {}
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        name = op_name(model, op)
        if name.startswith("CUSTOM:") and name[7:] not in _CUSTOM_OPS:
            out = _name(sg, op.Outputs(0)) if op.OutputsLength() else f"op {i}"
            found.setdefault(name[7:], out)
    if found:
        listed = ", ".join(f"'{k}' (output '{v}')" for k, v in found.items())
        raise ShrinkcError(f"'{path}' uses custom op{'s' if len(found) > 1 else ''} {listed}, which shrinkc "
                           "cannot compile", "convert the model with TFLite builtin ops only (no "
                           "allow_custom_ops / SELECT_TF_OPS), or replace the op in the source model")


def graph_inputs(model: tflite.Model, pins: dict[str, list[int]], notes: list[str]) -> list[TensorInfo]:
    """The subgraph's inputs with every dimension fixed (a free batch axis alone: 1, said in `notes`), or
    an error naming the dynamic one."""
    sg = model.Subgraphs(0)
    names = [_name(sg, idx) for idx in sg.InputsAsNumpy()]
    unknown = set(pins) - set(names)
    if unknown:
        raise ShrinkcError(f"--input names '{sorted(unknown)[0]}', which is not an input of the model",
                           f"the inputs are: {', '.join(names)}")
    result = []
    for idx in sg.InputsAsNumpy():
        t = sg.Tensors(int(idx))
        name, dtype = _name(sg, idx), _DTYPES.get(t.Type(), "float32")
        shape = [int(d) for d in t.ShapeAsNumpy()] if t.ShapeLength() else []
        sig = [int(d) for d in t.ShapeSignatureAsNumpy()] if t.ShapeSignatureLength() else shape
        dims: list = [s if g >= 0 else "?" for s, g in zip(shape, sig)] if len(sig) == len(shape) else shape
        if name in pins:
            pinned = [int(d) for d in pins[name]]
            if len(pinned) != len(dims):
                raise ShrinkcError(f"--input {name} has {len(pinned)} dimensions but the model's input has "
                                   f"{len(dims)} ({'x'.join(map(str, dims))})", f"pin all {len(dims)} dimensions")
            for axis, (d, p) in enumerate(zip(dims, pinned)):
                if isinstance(d, int) and d != p:
                    raise ShrinkcError(f"--input {name} sets axis {axis} to {p}, but the model fixes it at {d}",
                                       f"pin {name} as {'x'.join(str(x) if isinstance(x, int) else '1' for x in dims)}")
            dims = pinned
        dims, note = batch_one(name, dims)
        if note:
            notes.append(note)
        free = [axis for axis, d in enumerate(dims) if not isinstance(d, int)]
        if free:
            example = "x".join(str(d) if isinstance(d, int) else "1" for d in dims)
            raise ShrinkcError(f"input '{name}' has a dynamic dimension (axis {free[0]}, shape "
                               f"{'x'.join(map(str, dims))})", f"pin it with --input {name}:{example}")
        result.append(TensorInfo(name, dims, dtype))
    return result


# ---- sparse and external weights -----------------------------------------------------------------
def buffer_bytes(model: tflite.Model, raw: bytes, tensor) -> bytes:
    """A constant tensor's bytes, in the flatbuffer or (offset/size buffers) after it in the file."""
    buf = model.Buffers(tensor.Buffer())
    if buf.Offset() > 1:
        return raw[buf.Offset():buf.Offset() + buf.Size()]
    return buf.DataAsNumpy().tobytes() if buf.DataLength() else b""


def _index_array(kind: int, table) -> np.ndarray:
    vectors = {SparseIndexVector.Int32Vector: tflite.Int32Vector, SparseIndexVector.Uint16Vector: tflite.Uint16Vector,
               SparseIndexVector.Uint8Vector: tflite.Uint8Vector}
    if kind not in vectors or table is None:
        raise ValueError(f"sparse index vector of type {kind} is missing or unknown")
    vec = vectors[kind]()
    vec.Init(table.Bytes, table.Pos)
    return np.asarray(vec.ValuesAsNumpy() if vec.ValuesLength() else [], dtype=np.int64)


def densify(tensor, values: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Rebuild the dense array of a tensor stored with TFLite SparsityParameters; also its block shape.

    The tensor is seen as n + k dimensions: its n own ones (divided by their block sizes) and k block
    dimensions (block_map[j] says which own dimension block dimension n+j refines). dim_metadata[l]
    describes level l of the traversal, i.e. dimension traversal_order[l]: DENSE (dense_size
    positions under each parent position) or SPARSE_CSR (array_segments[p]..array_segments[p+1]
    index array_indices, the coordinates present under parent p). Leaves follow values in order.
    """
    sp = tensor.Sparsity()
    shape = [int(d) for d in tensor.ShapeAsNumpy()]
    n = len(shape)
    order = [int(d) for d in sp.TraversalOrderAsNumpy()] if sp.TraversalOrderLength() else list(range(n))
    block_map = [int(d) for d in sp.BlockMapAsNumpy()] if sp.BlockMapLength() else []
    k = len(block_map)
    if sorted(order) != list(range(n + k)) or sp.DimMetadataLength() != n + k:
        raise ValueError(f"traversal order {order} and {sp.DimMetadataLength()} dim metadata do not fit "
                         f"rank {n} with {k} block dimensions")
    levels = [sp.DimMetadata(i) for i in range(n + k)]
    block = [1] * n
    for j, dim in enumerate(block_map):
        md = levels[order.index(n + j)]
        if md.Format() != DimensionType.DENSE or dim >= n:
            raise ValueError("block dimensions must be DENSE and refine an existing dimension")
        block[dim] = int(md.DenseSize())
    coords: list[np.ndarray] = []   # one coordinate array per level, over the positions reached so far
    count = 1
    for md in levels:
        if md.Format() == DimensionType.DENSE:
            size = int(md.DenseSize())
            coords = [np.repeat(c, size) for c in coords] + [np.tile(np.arange(size, dtype=np.int64), count)]
            count *= size
        else:
            seg = _index_array(md.ArraySegmentsType(), md.ArraySegments())
            idx = _index_array(md.ArrayIndicesType(), md.ArrayIndices())
            if len(seg) != count + 1 or seg[0] != 0 or seg[-1] != len(idx) or np.any(np.diff(seg) < 0):
                raise ValueError("array_segments do not match the positions above or array_indices")
            coords = [np.repeat(c, np.diff(seg)) for c in coords] + [idx]
            count = len(idx)
    if count != values.size:
        raise ValueError(f"sparsity metadata describes {count} values but the buffer holds {values.size}")
    full = [np.zeros(count, np.int64) for _ in range(n)]
    for level, dim in enumerate(order):
        if dim < n:
            full[dim] += coords[level] * block[dim]
        else:
            full[block_map[dim - n]] += coords[level]
    if any(np.any(c >= s) for c, s in zip(full, shape)):
        raise ValueError(f"sparse coordinates fall outside the shape {shape}")
    dense = np.zeros(shape, values.dtype)
    dense[tuple(full)] = values
    return dense, block


def _np_dtype(tensor) -> np.dtype:
    return np.dtype(_DTYPES.get(tensor.Type(), "float32"))


def dense_value(model: tflite.Model, raw: bytes, tensor) -> tuple[np.ndarray, list[int]]:
    """A sparse constant's dense value and block shape, with errors naming the tensor."""
    data = np.frombuffer(buffer_bytes(model, raw, tensor), _np_dtype(tensor))
    try:
        return densify(tensor, data)
    except ValueError as err:
        raise ShrinkcError(f"sparse tensor '{tensor.Name().decode()}' has bad sparsity metadata: {err}",
                           _CORRUPT_FIX) from None


def _sparse_hints(model: tflite.Model, raw: bytes) -> dict[str, dict]:
    """{weight name as its consumers see it (after DENSIFY / DEQUANTIZE): {"stored": the sparse tensor's
    name, "shape": dense shape in TFLite layout, "block": block size per dimension (1 = none),
    "dtype": stored dtype, "nnz": non-zero elements, "size": all elements, "consumers": [{"op",
    "output": the op's output tensor (also its Relax variable name, sanitised), "input": position,
    "layout": weight layout for conv / FC}]}}."""
    sg = model.Subgraphs(0)
    consumers: dict[int, list[tuple[int, int]]] = {}
    for i in range(sg.OperatorsLength()):
        for pos, t in enumerate(sg.Operators(i).InputsAsNumpy() if sg.Operators(i).InputsLength() else []):
            consumers.setdefault(int(t), []).append((i, pos))
    hints = {}
    for idx in range(sg.TensorsLength()):
        tensor = sg.Tensors(idx)
        if tensor.Sparsity() is None:
            continue
        dense, block = dense_value(model, raw, tensor)
        cur = idx
        while len(consumers.get(cur, [])) == 1:
            op = sg.Operators(consumers[cur][0][0])
            if op_name(model, op) not in ("DENSIFY", "DEQUANTIZE"):
                break
            cur = int(op.Outputs(0))
        uses = []
        for i, pos in consumers.get(cur, []):
            op = sg.Operators(i)
            kind = op_name(model, op)
            uses.append({"op": kind, "output": _name(sg, op.Outputs(0)), "input": pos,
                         "layout": _LAYOUTS.get(kind) if pos == 1 else None})
        hints[_name(sg, cur)] = {"stored": _name(sg, idx), "shape": list(dense.shape), "block": block,
                                 "dtype": str(dense.dtype), "nnz": int(np.count_nonzero(dense)),
                                 "size": int(dense.size), "consumers": uses}
    return hints


# ---- dynamic-range quantized weights --------------------------------------------------------------
_HYBRID_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _dequantized(model: tflite.Model, raw: bytes, tensor) -> np.ndarray:
    """A quantized constant as float32: (q - zero point) * scale, per tensor or along its quantized axis."""
    q = tensor.Quantization()
    if tensor.Sparsity() is not None:
        values = dense_value(model, raw, tensor)[0]
    else:
        values = np.frombuffer(buffer_bytes(model, raw, tensor), _np_dtype(tensor)).reshape(
            [int(d) for d in tensor.ShapeAsNumpy()])
    return dequantize(values, q.ScaleAsNumpy(), q.ZeroPointAsNumpy() if q.ZeroPointLength() else None,
                      int(q.QuantizedDimension()))


def hybrid_weights(model: tflite.Model, raw: bytes) -> dict[int, np.ndarray]:
    """Weights of dynamic-range quantization (TFLite's Optimize.DEFAULT without a representative dataset):
    int8 constants with a scale that a conv or fully connected op with float32 input reads (directly, or
    through DENSIFY where they are also stored sparse). {tensor index: float32 value}, for the constant and
    the DENSIFY output alike."""
    sg = model.Subgraphs(0)
    producer = {int(sg.Operators(i).Outputs(0)): sg.Operators(i) for i in range(sg.OperatorsLength())
                if sg.Operators(i).OutputsLength()}
    found: dict[int, np.ndarray] = {}
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        ins = [int(t) for t in op.InputsAsNumpy()] if op.InputsLength() else []
        if op_name(model, op) not in _HYBRID_OPS or not ins or ins[0] < 0 \
                or sg.Tensors(ins[0]).Type() != TensorType.FLOAT32:
            continue
        for idx in ins[1:]:
            src = idx
            if idx in producer and op_name(model, producer[idx]) == "DENSIFY":
                src = int(producer[idx].Inputs(0))
            tensor = sg.Tensors(src) if src >= 0 else None
            if tensor is None or tensor.Type() not in (TensorType.INT8, TensorType.UINT8) \
                    or tensor.Quantization() is None or not tensor.Quantization().ScaleLength():
                continue
            if src not in found:
                found[src] = _dequantized(model, raw, tensor)
            found[idx] = found[src]
    return found


def quantized_activations(model: tflite.Model) -> int:
    """How many op outputs are int8 / uint8 tensors with a quantization scale (an integer-quantized model)."""
    sg = model.Subgraphs(0)
    count = 0
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        for idx in (op.OutputsAsNumpy() if op.OutputsLength() else []):
            t = sg.Tensors(int(idx))
            count += t.Type() in (TensorType.INT8, TensorType.UINT8) and t.Quantization() is not None \
                and bool(t.Quantization().ScaleLength()) and op_name(model, op) != "DENSIFY"
    return count


class _FloatView:
    """A TFLite tensor seen as unquantized float32 (a dequantized weight); the rest read from the tensor."""

    def __init__(self, tensor):
        self._tensor = tensor

    def Type(self):  # noqa: N802 (the flatbuffer API's name)
        return TensorType.FLOAT32

    def Quantization(self):  # noqa: N802
        return None

    def __getattr__(self, name):
        return getattr(self._tensor, name)


def sparse_hints(path: str) -> dict[str, dict]:
    """The sparse-stored weights of a .tflite file (what import_tflite puts in the HINTS_ATTR attribute)."""
    raw, model = load_tflite(path)
    return _sparse_hints(model, raw)


# ---- the converter -------------------------------------------------------------------------------
_MOVING_QUANTIZED_OPS = frozenset({
    "PAD", "PADV2", "MIRROR_PAD", "TRANSPOSE", "STRIDED_SLICE", "SLICE", "DEPTH_TO_SPACE", "SPACE_TO_DEPTH",
    "RESIZE_NEAREST_NEIGHBOR", "SQUEEZE", "EXPAND_DIMS", "SPLIT", "SPLIT_V", "PACK", "UNPACK", "GATHER", "TILE",
    "BATCH_TO_SPACE_ND", "SPACE_TO_BATCH_ND"})
_FLOAT_QUANTIZED_OPS = frozenset({"PRELU", "GELU", "ELU", "L2_NORMALIZATION", "BATCH_MATMUL"})


class _Converter(_tvm_tflite.OperatorConverter):
    """TVM's converter with our DENSIFY, fp16 DEQUANTIZE and dequantized int8 weights, named layers and errors naming
    the op."""

    raw: bytes = b""
    hybrid: dict = {}    # dynamic-range quantized weights by tensor index, dequantized (hybrid_weights)
    counted: dict = {}   # ModelInfo.counted_by of the file
    # SHAPE reads only the shape of its (quantized) input: Keras models with a dynamic batch reshape through
    # SHAPE -> STRIDED_SLICE -> PACK, and integer-quantized ones were refused for it. The ops that move values
    # (_MOVING_QUANTIZED_OPS) move the stored integers as TFLite's kernels do (which require the input's scale and
    # zero point on the output; PAD fills with the zero point, as TVM's converter does); _FLOAT_QUANTIZED_OPS are
    # computed on the dequantized values (in_float). TVM refused all of them on integer-quantized models.
    _SUPPORTED_QUANTIZED_OPS = _tvm_tflite.OperatorConverter._SUPPORTED_QUANTIZED_OPS | {"SHAPE"} | \
        _MOVING_QUANTIZED_OPS | _FLOAT_QUANTIZED_OPS
    floats: dict = {}    # while an op of _FLOAT_QUANTIZED_OPS converts: its quantized inputs' dequantized exprs

    def __init__(self, model, subgraph, exp_tab, ctx, conversion_state=None):
        super().__init__(model, subgraph, exp_tab, ctx, conversion_state)
        self.convert_map.update(zip(_MEDIAPIPE_OPS, (self.convert_transpose_conv_bias, self.convert_max_pool_argmax,
                                                     self.convert_max_unpool, self.convert_landmarks_to_matrix,
                                                     self.convert_transform_tensor, self.convert_transform_landmarks,
                                                     self.convert_resampler)))
        self.convert_map = {k: self._named(k, f) for k, f in self.convert_map.items()}

    def get_op_code_str(self, op):
        code = self.model.OperatorCodes(op.OpcodeIndex())
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) == BuiltinOperator.CUSTOM and \
                (code.CustomCode() or b"").decode() in _MEDIAPIPE_OPS:
            return code.CustomCode().decode()
        return super().get_op_code_str(op)

    def _struct_options(self, op, count: int, what: str) -> list[int]:
        """The first `count` int32 fields of a MediaPipe op's options, which it stores as the raw C struct of its
        parameters (`what` names them for the error)."""
        raw = op.CustomOptionsAsNumpy().tobytes() if op.CustomOptionsLength() else b""
        if len(raw) < 4 * count:
            out = _name(self.subgraph, int(op.OutputsAsNumpy()[0]))
            raise ShrinkcError(f"{self.get_op_code_str(op)} (output '{out}') has {len(raw)} bytes of options, not the "
                               f"{4 * count} of its {what}", "re-export the model with MediaPipe's converter")
        return [int(v) for v in np.frombuffer(raw[:4 * count], "<i4")]

    def _window(self, op) -> tuple[int, int]:
        """A MediaPipe pooling op's window (kh, kw) from its options, the raw C struct TfLitePoolParams (int32 padding:
        1 SAME, 2 VALID; stride_w, stride_h, filter_w, filter_h, activation): windows as large as their stride and
        no activation, as LiteRT runs them; the pooling SAME too where the plane is whole windows (then it equals
        VALID)."""
        x, out = self.get_input_tensors(op)[0], _name(self.subgraph, int(op.OutputsAsNumpy()[0]))
        what = self.get_op_code_str(op)
        padding, sw, sh, fw, fh, act = self._struct_options(op, 6, "padding, strides, window and activation")
        _, h, w, _ = (int(d) for d in x.tensor.ShapeAsNumpy())
        whole = padding == 2 or (padding == 1 and what == MAX_POOL_ARGMAX
                                 and min(fh, fw) >= 1 and not h % fh and not w % fw)
        if (fh, fw) != (sh, sw) or act or min(fh, fw) < 1 or not whole:
            raise ShrinkcError(f"{what} (output '{out}') with a {fh}x{fw} window, stride "
                               f"{sh}x{sw}, padding {padding} and activation {act} is not supported",
                               "only windows as large as their stride, without padding or activation, are")
        return fh, fw

    def _bits_as(self, expr, dtype: str):
        """expr's 32-bit values read as dtype, bit for bit (the argmax indices' int32 bits in a float32 tensor)."""
        return self.bb.emit_te(lambda a: te.compute(a.shape, lambda *i: tirx.reinterpret(dtype, a(*i)),
                                                    name=f"bits_as_{dtype}"), expr)

    def convert_max_pool_argmax(self, op):
        """MediaPipe's MaxPoolingWithArgmax2D: the window maxima, and where in its window each was, as LiteRT's
        XNNPACK delegate writes it: the position x * kh + y (column after column), the first on ties, its int32 bits
        stored in the float32 output."""
        kh, kw = self._window(op)
        (x,) = self.get_input_tensors(op)
        n, h, w, c = (int(d) for d in x.tensor.ShapeAsNumpy())
        oh, ow = h // kh, w // kw
        e = relax.op.strided_slice(self.get_tensor_expr(x), axes=[1, 2], begin=[0, 0], end=[oh * kh, ow * kw])
        win = relax.op.permute_dims(relax.op.reshape(e, [n, oh, kh, ow, kw, c]), [0, 1, 3, 4, 2, 5])
        win = self.bb.emit(relax.op.reshape(win, [n, oh, ow, kw * kh, c]))        # window positions x * kh + y
        where = relax.op.astype(relax.op.argmax(win, axis=3), "int32")          # the first maximum
        return relax.Tuple([relax.op.max(win, axis=3), self._bits_as(self.bb.emit(where), "float32")])

    def convert_max_unpool(self, op):
        """MediaPipe's MaxUnpooling2D: each value back at the position in its window that the indices (as
        MaxPoolingWithArgmax2D writes them) name, zeros elsewhere."""
        kh, kw = self._window(op)
        (v, idx), (out,) = self.get_input_tensors(op), self.get_output_tensors(op)
        n, oh, ow, c = (int(d) for d in v.tensor.ShapeAsNumpy())
        if [int(d) for d in out.tensor.ShapeAsNumpy()] != [n, oh * kh, ow * kw, c]:
            raise ShrinkcError(f"{MAX_UNPOOL} (output '{_name(self.subgraph, out.tensor_idx)}') to "
                               f"{list(out.tensor.ShapeAsNumpy())} is not its input's {kh}x{kw} windows",
                               "only outputs of whole windows are supported")
        where = self._bits_as(self.get_tensor_expr(idx), "int32")
        slots = self.exp_tab.new_const(np.arange(kw * kh, dtype=np.int32).reshape(1, 1, 1, -1, 1), dtype="int32")
        hit = relax.op.equal(relax.op.expand_dims(where, 3), slots)                 # [n, oh, ow, kw * kh, c]
        spread = relax.op.where(hit, relax.op.expand_dims(self.get_tensor_expr(v), 3),
                                relax.const(0.0, "float32"))
        spread = relax.op.permute_dims(relax.op.reshape(spread, [n, oh, ow, kw, kh, c]), [0, 1, 4, 2, 3, 5])
        return relax.op.reshape(spread, [n, oh * kh, ow * kw, c])

    def convert_transpose_conv_bias(self, op):
        """MediaPipe's Convolution2DTransposeBias: TRANSPOSE_CONV's computation (padding as TFLite computes it from the
        output size) plus a bias, with its inputs (input, OHWI weights, bias) and its options as the raw C struct
        TfLiteTransposeConvParams (int32 padding: 1 SAME, 2 VALID; stride_w; stride_h). Float only."""
        (x, w, b), (out,) = self.get_input_tensors(op), self.get_output_tensors(op)
        padding, stride_w, stride_h = self._struct_options(op, 3, "padding and strides")
        if padding not in (1, 2) or x.qnn_params or stride_w < 1 or stride_h < 1:
            raise ShrinkcError(f"{TRANSPOSE_CONV_BIAS} (output '{_name(self.subgraph, out.tensor_idx)}') with padding "
                               f"{padding}, strides {stride_h}x{stride_w}{' on quantized input' * bool(x.qnn_params)} "
                               "is not supported", "only float SAME / VALID ones are")
        _, oh, ow, _ = (int(d) for d in out.tensor.ShapeAsNumpy())
        _, kh, kw, _ = (int(d) for d in w.tensor.ShapeAsNumpy())
        pads = (0, 0, 0, 0)
        if padding == 1:
            (top, bottom), (left, right) = (_tvm_tflite.get_pad_value(oh, kh, stride_h),
                                            _tvm_tflite.get_pad_value(ow, kw, stride_w))
            pads = (top, left, bottom, right)
        weight = np.transpose(np.asarray(self.get_tensor_value(w), np.float32), (3, 0, 1, 2))     # OHWI -> IOHW
        y = relax.op.nn.conv2d_transpose(self.get_tensor_expr(x), self.exp_tab.new_const(weight, dtype="float32"),
                                         strides=(stride_h, stride_w), padding=pads, data_layout="NHWC",
                                         kernel_layout="IOHW", out_dtype="float32")
        bias = np.asarray(self.get_tensor_value(b), np.float32).reshape(-1)
        return relax.op.add(self.bb.emit(y), self.exp_tab.new_const(bias, dtype="float32"))

    def _geometry_options(self, op, versions: dict[int, tuple[str, ...]]) -> tuple[int, dict, str]:
        """A MediaPipe geometry op's version (its op code's), options (a flexbuffer map, with the keys that version
        needs) and output name; one clear error for another version or a missing key."""
        from flatbuffers import flexbuffers
        what, out = self.get_op_code_str(op), _name(self.subgraph, int(op.OutputsAsNumpy()[0]))
        version = int(self.model.OperatorCodes(op.OpcodeIndex()).Version())
        if version not in versions:
            raise ShrinkcError(f"{what} (output '{out}') version {version} is not supported",
                               f"versions {' and '.join(map(str, versions))} are (MediaPipe's)")
        raw = op.CustomOptionsAsNumpy().tobytes() if op.CustomOptionsLength() else b""
        try:
            opts = flexbuffers.Loads(raw) if raw else {}
        except Exception:    # NOTE: flexbuffers raises bare errors (IndexError, struct.error) on bad bytes
            opts = None
        missing = [k for k in versions[version] if not isinstance(opts, dict) or k not in opts]
        if missing:
            raise ShrinkcError(f"{what} (output '{out}') version {version} lacks the option(s) {', '.join(missing)}",
                               "re-export the model with MediaPipe's converter")
        return version, opts, out

    def convert_landmarks_to_matrix(self, op):
        """MediaPipe's Landmarks2TransformMatrix: landmarks (x, y, z) -> the [1, 4, 4] matrix of a crop around them."""
        version, opts, out = self._geometry_options(op, {
            1: ("input_hw", "output_hw", "landmarks_range", "bbox_size_multiplier", "left_rotation_idx",
                "right_rotation_idx", "subset"),
            2: ("left_rotation_idx", "right_rotation_idx", "target_rotation_radians", "subset_idxs", "output_width",
                "output_height", "scale_x", "scale_y")})
        (x,) = self.get_input_tensors(op)
        count = int(np.prod(x.tensor.ShapeAsNumpy())) // 3
        subset = list(opts["subset" if version == 1 else "subset_idxs"])
        used = [opts["left_rotation_idx"], opts["right_rotation_idx"]] + subset
        if not subset or min(used) < 0 or max(used) >= count:
            raise ShrinkcError(f"{LANDMARKS_TO_MATRIX} (output '{out}') names landmarks {used} of {count}",
                               "the indices must name landmarks of its input")
        # what MediaPipe's kernel refuses at run time, refused here
        sizes = [*opts["input_hw"], *opts["output_hw"], opts["landmarks_range"], opts["bbox_size_multiplier"]] \
            if version == 1 else [opts["output_width"], opts["output_height"], opts["scale_x"], opts["scale_y"]]
        if min(sizes) <= 0 or (version == 1 and opts.get("dimensions", 3) != 3):
            raise ShrinkcError(f"{LANDMARKS_TO_MATRIX} (output '{out}') version {version} has options "
                               f"{ {k: v for k, v in opts.items() if not isinstance(v, list)} } that MediaPipe's "
                               "kernel refuses", "sizes, range and scales must be positive, dimensions 3")
        build = geometry.landmarks_to_transform_matrix_v1 if version == 1 else \
            geometry.landmarks_to_transform_matrix_v2
        return build(self.bb, self.get_tensor_expr(x), count, opts)

    def convert_transform_tensor(self, op):
        """MediaPipe's TransformTensorBilinear: a [1, H, W, C] float tensor warped by a [1, 4, 4] matrix to the output's
        size, bilinear."""
        version, opts, out = self._geometry_options(op, {1: (), 2: ()})
        (x, m), (y,) = self.get_input_tensors(op), self.get_output_tensors(op)
        shape, out_shape = [int(d) for d in x.tensor.ShapeAsNumpy()], [int(d) for d in y.tensor.ShapeAsNumpy()]
        if opts.get("mode", "bilinear") != "bilinear" or len(shape) != 4 or shape[0] != 1 or x.qnn_params or \
                len(out_shape) != 4 or out_shape[3] != shape[3]:
            raise ShrinkcError(f"{TRANSFORM_TENSOR} (output '{out}') of {shape} to "
                               f"{out_shape}, mode {opts.get('mode')!r}, is not supported",
                               "only float [1, H, W, C] tensors, bilinear, are")
        return geometry.transform_tensor_bilinear(self.bb, self.get_tensor_expr(x), self.get_tensor_expr(m), shape,
                                                  (out_shape[1], out_shape[2]), version)

    def convert_transform_landmarks(self, op):
        """MediaPipe's TransformLandmarks: landmarks' (x, y) mapped by a [1, 4, 4] matrix, z kept."""
        version, opts, out = self._geometry_options(op, {1: (), 2: ()})
        (lm, m) = self.get_input_tensors(op)
        shape = [int(d) for d in lm.tensor.ShapeAsNumpy()]
        dims = int(opts.get("dimensions", 3)) if version == 1 else shape[-1]
        scale = float(opts.get("scale", 1.0)) if version == 1 else 1.0
        if dims not in (2, 3) or shape[-1] % dims or len(shape) != (4 if version == 1 else 3) or scale == 0:
            raise ShrinkcError(f"{TRANSFORM_LANDMARKS} (output '{out}') version {version} on {shape} with dimensions "
                               f"{dims}, scale {scale} is not supported",
                               "landmarks of 2 or 3 values each, [1, H, W, k * dims] (version 1) or [1, N, dims]")
        return geometry.transform_landmarks(self.bb, self.get_tensor_expr(lm), self.get_tensor_expr(m), shape, dims,
                                            scale)

    def convert_resampler(self, op):
        """MediaPipe's Resampler: a [B, H, W, C] float tensor sampled at the points of a [B, H, W, 2] warp."""
        _, _, out = self._geometry_options(op, {1: ()})
        x, warp = self.get_input_tensors(op)
        shape, warp_shape = [int(d) for d in x.tensor.ShapeAsNumpy()], [int(d) for d in warp.tensor.ShapeAsNumpy()]
        if len(shape) != 4 or warp_shape != shape[:3] + [2] or x.qnn_params:
            raise ShrinkcError(f"{RESAMPLER} (output '{out}') of {shape} at a warp of "
                               f"{warp_shape} is not supported", "only float [B, H, W, C] with a [B, H, W, 2] warp")
        return geometry.resampler(self.bb, self.get_tensor_expr(x), self.get_tensor_expr(warp), shape)

    def _named(self, kind: str, convert):
        def run(op):
            outs = [int(i) for i in op.OutputsAsNumpy()] if op.OutputsLength() else []
            out_name = _name(self.subgraph, outs[0]) if outs else "?"
            try:
                ret = self.in_float(op, convert) if kind in _FLOAT_QUANTIZED_OPS and self.is_quantized(op) \
                    else convert(op=op)
            except ShrinkcError:
                raise
            except Exception as err:
                msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                raise ShrinkcError(f"cannot import TFLite op {kind} (output '{out_name}'): {msg[:200]}",
                                   "check the op's options and shapes, or open an issue naming the op") from None
            if isinstance(ret, relax.Call) and len(outs) == 1:
                ret = self.bb.emit(ret, name_hint=_sanitize(out_name))
            return ret
        return run

    def check_unsupported_ops(self):
        try:
            super().check_unsupported_ops()
        except tvm.error.OpNotImplemented as err:
            raise ShrinkcError(f"the model has ops shrinkc cannot import: {str(err).strip()}",
                               "convert the model with other builtin ops, or open an issue naming the op") from None

    def in_float(self, op, convert):
        """A quantized op converted as the float op on its dequantized inputs, then quantized to its output's step:
        while `convert` runs, its quantized inputs and outputs read as float32 tensors (get_tensors) whose exprs are
        the dequantized ones (get_expr, get_tensor_expr)."""
        ins, (out,) = self.get_input_tensors(op), self.get_output_tensors(op)
        floats = {t.tensor_idx: self.bb.emit(self.dequantize(self.get_tensor_expr(t), t)) for t in ins
                  if t.tensor_idx != -1 and t.qnn_params}
        self.floats = {**floats, out.tensor_idx: None}
        try:
            result = convert(op=op)
        finally:
            self.floats = {}
        return self.quantize(result, out)

    def get_tensors(self, tensors_idx_list):
        """Dequantized weights (and, inside in_float, an op's quantized tensors) read as float32 tensors without
        quantization: the op becomes a float op."""
        return [_tvm_tflite.TensorWrapper(w.tensor_idx, _FloatView(w.tensor), w.buffer, None)
                if w.tensor_idx in self.hybrid or w.tensor_idx in self.floats else w
                for w in super().get_tensors(tensors_idx_list)]

    def get_tensor_expr(self, tensor, is_sparse=False):
        if self.floats.get(tensor.tensor_idx) is not None:
            return self.floats[tensor.tensor_idx]
        return super().get_tensor_expr(tensor, is_sparse)

    def get_tensor_value(self, tensor_wrapper, is_sparse=False):
        idx, tensor = tensor_wrapper.tensor_idx, tensor_wrapper.tensor
        if idx in self.hybrid:
            return self.hybrid[idx]
        if self.is_prefetched(idx):
            return self.get_prefetched_node(idx)
        if tensor.Sparsity() is not None:
            return dense_value(self.model, self.raw, tensor)[0]
        if self.model.Buffers(tensor.Buffer()).Offset() > 1:
            data = np.frombuffer(buffer_bytes(self.model, self.raw, tensor), _np_dtype(tensor))
            return data.reshape([int(d) for d in tensor.ShapeAsNumpy()])
        return super().get_tensor_value(tensor_wrapper, is_sparse)

    def get_expr(self, input_tensor_idx):
        """A prefetched constant (densified / dequantized weight) or a constant tensor of the file read as an
        expression by any op (TVM's BATCH_MATMUL converter, among others, read a constant operand this way and
        failed on it); inside in_float, a quantized input's dequantized expr."""
        if self.floats.get(input_tensor_idx) is not None:
            return self.floats[input_tensor_idx]
        if not self.has_expr(input_tensor_idx):
            if self.is_prefetched(input_tensor_idx):
                value = self.get_prefetched_node(input_tensor_idx)
                return self.exp_tab.new_const(value, dtype=str(value.dtype))
            (tensor,) = self.get_tensors([input_tensor_idx])
            if tensor.buffer is not None and tensor.buffer.DataLength():
                return self.get_tensor_expr(tensor)
        return super().get_expr(input_tensor_idx)

    def convert_fully_connected(self, op):
        """TVM keeps the input's rank; TFLite (keep_num_dims false) gives [rows, units]."""
        out = super().convert_fully_connected(op)
        opts = tflite.FullyConnectedOptions()
        opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
        units = int(self.get_input_tensors(op)[1].tensor.Shape(0))
        out = self.bb.normalize(out)   # NOTE: a fused activation's call has no type until normalized
        if not opts.KeepNumDims() and out.ty.ndim not in (2, -1):
            out = relax.op.reshape(out, (-1, units))
        return out

    def convert_reshape(self, op):
        """A shape computed in the graph (SHAPE -> STRIDED_SLICE -> PACK, what converters emit for a
        dynamic batch) is read from the output tensor instead: shrinkc serves static shapes."""
        ins, (out,) = self.get_input_tensors(op), self.get_output_tensors(op)
        if len(ins) == 2 and self.has_expr(ins[1].tensor_idx):
            sig = out.tensor.ShapeSignatureAsNumpy() if out.tensor.ShapeSignatureLength() else []
            shape = [int(d) for d in sig] if list(sig).count(-1) == 1 else \
                [int(d) for d in out.tensor.ShapeAsNumpy()]
            return relax.op.reshape(self.get_expr(ins[0].tensor_idx), shape)
        return super().convert_reshape(op)

    def convert_resize_nearest_neighbor(self, op):
        """TFLite rounds an align_corners source coordinate half away from zero (x.5 up: the coordinates are >= 0);
        TVM's converter left the rounding to topi, which rounds x.5 to even: such output pixels read the wrong
        row or column."""
        out = super().convert_resize_nearest_neighbor(op)
        a = out.attrs
        if str(a.coordinate_transformation_mode) == "align_corners" and str(a.rounding_method) == "":
            out = resize2d_like(out, out.args[0], rounding_method="round_prefer_ceil")
        return out

    def convert_pool2d(self, op, pool_type):
        """TFLite averages quantized values to the nearest step, halves away from zero ((sum + n / 2) / n); TVM's
        converter pools them in int32, whose division truncates: about half of the pooled values came out one step
        too low (too high below zero). Averaged in float32 here and rounded as TFLite does."""
        out = super().convert_pool2d(op, pool_type)
        return _rounded_quantized_pool(out) if pool_type == "average" else out

    def convert_expand_dims(self, op):
        """TVM's converter called relax's expand_dims with a third argument it does not take: every EXPAND_DIMS (a
        1-D conv's TFLite form, EXPAND_DIMS -> CONV_2D -> SQUEEZE) failed to import."""
        x, axis = self.get_input_tensors(op)
        rank = len(_tvm_tflite.to_int_list(self.get_tensor_shape(x)))
        axis = int(np.asarray(self.get_tensor_value(axis)).reshape(-1)[0])
        return relax.op.expand_dims(self.get_tensor_expr(x), axis + rank + 1 if axis < 0 else axis)

    def convert_squeeze(self, op):
        """A SQUEEZE without squeeze_dims drops every axis of size 1 (TVM's converter failed reading the absent
        list)."""
        table = op.BuiltinOptions()
        if table is not None:
            opts = tflite.SqueezeOptions()
            opts.Init(table.Bytes, table.Pos)
            if opts.SqueezeDimsLength():
                return super().convert_squeeze(op)
        (x,) = self.get_input_tensors(op)
        return relax.op.squeeze(self.get_tensor_expr(x))

    def convert_detection_postprocess(self, op):
        """An SSD detector's TFLite_Detection_PostProcess, TVM's converter; it gives max_detections rows, so more than
        one class per detection (max_detections x that many rows in TFLite) is refused. Its boxes, classes and
        scores past the number of detections are undefined in LiteRT (zeros here): `counted` notes them for verify."""
        opts = _tvm_tflite.FlexBufferDecoder(op.CustomOptionsAsNumpy().tobytes()).decode()
        outs = [_name(self.subgraph, i) for i in op.OutputsAsNumpy()]
        if int(opts.get("max_classes_per_detection", 1)) != 1:
            raise ShrinkcError(f"TFLite_Detection_PostProcess (output '{outs[0]}') with max_classes_per_detection "
                               f"{opts['max_classes_per_detection']} is not supported (only 1)",
                               "convert the detector with max_classes_per_detection 1 (TF's SSD configs' default)")
        self.counted.update({name: outs[3] for name in outs[:3]})
        return super().convert_detection_postprocess(op)

    def convert_gather_nd(self, op):
        """relax's gather_nd reads coordinates along the indices' last axis, as TFLite writes them; TVM's converter
        moved that axis first (topi's order), so the output gathered the wrong elements, and past the data."""
        (data, indices) = self.get_input_tensors(op)
        return relax.op.gather_nd(self.get_tensor_expr(data), relax.op.astype(self.get_tensor_expr(indices), "int64"))

    def convert_space_to_batch_nd(self, op):
        """Zero-pad the M spatial axes, then move each block offset to the batch axis (TVM's converter called a
        packed function that is not there). TF1's converter wrote dilated convs this way, around a plain conv."""
        (x, block, pads), (out,) = self.get_input_tensors(op), self.get_output_tensors(op)
        block = [int(v) for v in np.asarray(self.get_tensor_value(block)).reshape(-1)]
        pads = np.asarray(self.get_tensor_value(pads)).reshape(-1, 2)
        shape = _tvm_tflite.to_int_list(self.get_tensor_shape(x))
        m = len(block)
        expr = relax.op.nn.pad(self.get_tensor_expr(x), [0, 0, *[int(v) for v in pads.reshape(-1)],
                                                           *[0, 0] * (len(shape) - 1 - m)], pad_value=_pad_zero(x))
        padded = [shape[1 + i] + int(pads[i].sum()) for i in range(m)]
        split = [shape[0]] + [d for i in range(m) for d in (padded[i] // block[i], block[i])] + shape[1 + m:]
        order = [2 + 2 * i for i in range(m)] + [0] + [1 + 2 * i for i in range(m)] + list(range(1 + 2 * m, len(split)))
        expr = relax.op.permute_dims(relax.op.reshape(expr, split), order)
        return relax.op.reshape(expr, _tvm_tflite.to_int_list(self.get_tensor_shape(out)))

    def convert_batch_to_space_nd(self, op):
        """Move the batch's block offsets back into the M spatial axes, then crop (TVM's converter failed)."""
        (x, block, crops), (out,) = self.get_input_tensors(op), self.get_output_tensors(op)
        block = [int(v) for v in np.asarray(self.get_tensor_value(block)).reshape(-1)]
        crops = np.asarray(self.get_tensor_value(crops)).reshape(-1, 2)
        shape = _tvm_tflite.to_int_list(self.get_tensor_shape(x))
        m, batch = len(block), shape[0] // int(np.prod(block))
        rest = shape[1 + m:]
        expr = relax.op.reshape(self.get_tensor_expr(x), [*block, batch, *shape[1:]])
        order = [m] + [d for i in range(m) for d in (m + 1 + i, i)] + list(range(2 * m + 1, 2 * m + 1 + len(rest)))
        full = [shape[1 + i] * block[i] for i in range(m)]
        expr = relax.op.reshape(relax.op.permute_dims(expr, order), [batch, *full, *rest])
        return relax.op.strided_slice(expr, axes=list(range(1, m + 1)), begin=[int(c) for c in crops[:, 0]],
                                      end=[full[i] - int(crops[i, 1]) for i in range(m)])

    def convert_densify(self, op):
        (src,), (out,) = self.get_input_tensors(op), self.get_output_tensors(op)
        self.set_prefetched_node(out.tensor_idx, self.get_tensor_value(src))

    def convert_dequantize(self, op):
        (src,), (out,) = self.get_input_tensors(op), self.get_output_tensors(op)
        if src.tensor.Type() != TensorType.FLOAT16:
            return super().convert_dequantize(op)
        if self.has_expr(src.tensor_idx):
            return relax.op.astype(self.get_expr(src.tensor_idx), "float32")
        self.set_prefetched_node(out.tensor_idx, np.asarray(self.get_tensor_value(src), np.float32))
        return None


def _pad_zero(tensor) -> float:
    """The value a zero pads with: 0, or a quantized tensor's zero point."""
    return float(tensor.qnn_params["zero_point"].value.numpy()) if tensor.qnn_params else 0.0


def _rounded_quantized_pool(expr):
    """astype(avg_pool2d(astype(q, int32)), dt) (under the clip of a fused activation) with the average taken in
    float32 and rounded half away from zero before the cast back; anything else as it is."""
    if not isinstance(expr, relax.Call):
        return expr
    if expr.op.name == "relax.clip":
        return relax.Call(expr.op, [_rounded_quantized_pool(expr.args[0]), *expr.args[1:]], expr.attrs)
    pool = expr.args[0] if expr.op.name == "relax.astype" else None
    if not (isinstance(pool, relax.Call) and pool.op.name == "relax.nn.avg_pool2d"
            and isinstance(pool.args[0], relax.Call) and pool.args[0].op.name == "relax.astype"
            and str(pool.args[0].attrs.dtype) == "int32"):
        return expr
    mean = relax.Call(pool.op, [relax.op.astype(pool.args[0].args[0], "float32")], pool.attrs)
    half = relax.const(0.5, "float32")
    rounded = relax.op.multiply(relax.op.sign(mean), relax.op.floor(relax.op.add(relax.op.abs(mean), half)))
    return relax.op.astype(rounded, str(expr.attrs.dtype))


def _sanitize(name: str) -> str:
    s = re.sub(r"[^0-9a-zA-Z_]", "_", name)
    return s if s and not s[0].isdigit() else "n_" + s


def import_tflite(path: str, pins: dict[str, list[int]] | None = None) -> tuple[tvm.IRModule, ModelInfo]:
    """.tflite file -> (Relax module with weights as float32 constants, the model's signature).

    Sparse-stored weights are densified here; the module's HINTS_ATTR attribute maps each such
    weight's name to a JSON string (see sparse_hints) so later passes can use the sparsity.
    """
    raw, model = load_tflite(path)
    path = os.path.abspath(path)
    _check_custom_ops(model, path)
    notes: list[str] = []
    inputs = graph_inputs(model, pins or {}, notes)
    hints = _sparse_hints(model, raw)
    hybrid, quantized = hybrid_weights(model, raw), quantized_activations(model)
    if hybrid:
        notes.append(f"dynamic-range quantized: {len({id(v) for v in hybrid.values()})} int8 weight(s) dequantized "
                     "and computed in float32 (LiteRT quantizes those ops' inputs to int8 at run time, so "
                     f"--verify allows a relative difference of {QUANTIZED_VERIFY_TOLERANCE:g})")
    if quantized:
        notes.append(f"quantized activations: {quantized} int8 tensor(s), computed in float32 with their quantize "
                     "steps, 1x1 convs reading them in int32 where the CPU has AVX-512 VNNI (a different summation "
                     "order moves single values by one int8 step, so --verify "
                     f"allows a relative difference of {QUANTIZED_VERIFY_TOLERANCE:g})")
    counted: dict[str, str] = {}
    converter = type("_FileConverter", (_Converter,), {"raw": raw, "hybrid": hybrid, "counted": counted})
    failure = None
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            mod = _tvm_tflite.from_tflite(model, shape_dict={t.name: tuple(t.shape) for t in inputs},
                                          dtype_dict={t.name: t.dtype for t in inputs}, op_converter=converter)
    except ShrinkcError as err:
        failure = err
    except Exception as err:
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        failure = ShrinkcError(f"cannot import '{path}': {msg[:200]}", "open an issue with the model attached")
    if failure is not None:
        raise released(failure) from None
    if hints:
        mod = mod.with_attr(HINTS_ATTR, {k: json.dumps(v) for k, v in hints.items()})
    sg = model.Subgraphs(0)
    ret = mod["main"].ret_ty
    fields = ret.fields if isinstance(ret, relax.TupleType) else [ret]
    outputs = []
    for idx, ty in zip(sg.OutputsAsNumpy(), fields):
        name = _name(sg, idx)
        if not isinstance(ty, relax.TensorType) or ty.shape is None or any(
                not isinstance(d, tvm.tirx.IntImm) for d in ty.shape.values):
            raise ShrinkcError(f"output '{name}' has a shape that depends on the data",
                               "shrinkc serves static shapes only; pin every input with --input")
        outputs.append(TensorInfo(name, [int(d) for d in ty.shape.values], str(ty.dtype)))
    return mod, ModelInfo("tflite", path, inputs, outputs, notes,
                          verify_tolerance=QUANTIZED_VERIFY_TOLERANCE if hybrid or quantized else 0.0,
                          counted_by=counted)
