"""Write .tflite files from code (no TensorFlow): plain fp32, fp16 + DEQUANTIZE and sparse + DENSIFY weights."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import flatbuffers
import numpy as np
import tflite
from tflite.BuiltinOperator import BuiltinOperator as _Op
from tflite.BuiltinOptions import BuiltinOptions as _Opt
from tflite.TensorType import TensorType

from zoo.mobilenet_v2 import _BLOCKS, make_divisible

_ACTS = {"NONE": 0, "RELU": 1, "RELU6": 3}
_PADS = {"SAME": 0, "VALID": 1}
_TYPES = {"float32": TensorType.FLOAT32, "float16": TensorType.FLOAT16, "int32": TensorType.INT32}
_SPARSE_BLOCKS = {"csr": None, "block4x1": 4}  # block4x1: blocks of 4 output channels x 1


def encode_sparse(dense: np.ndarray, block: tuple[int, ...] | None = None) -> tuple[np.ndarray, dict]:
    """Dense array -> (stored values, sparsity dict) in TFLite's layout, as its sparsity converter emits it.

    Traversal order is the identity; the original dimensions are DENSE except the last, which is
    SPARSE_CSR; each dimension with a block size > 1 adds one trailing DENSE block dimension. A block
    is stored when any of its elements is non-zero (zeros inside a stored block are kept).
    """
    n = dense.ndim
    block = tuple(block) if block else (1,) * n
    if len(block) != n or any(s % b for s, b in zip(dense.shape, block)):
        raise ValueError(f"block {block} does not tile shape {dense.shape}")
    blocked = [i for i in range(n) if block[i] != 1]
    outer = [s // b for s, b in zip(dense.shape, block)]
    t = dense.reshape([x for pair in zip(outer, block) for x in pair])
    t = t.transpose([2 * i for i in range(n)] + [2 * i + 1 for i in range(n)])
    blocks = t.reshape(int(np.prod(outer[:-1])), outer[-1], -1)
    keep = np.any(blocks != 0, axis=2)
    segments = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
    indices = np.nonzero(keep)[1].astype(np.int64)
    dims = [{"format": "DENSE", "dense_size": outer[i]} for i in range(n - 1)]
    dims.append({"format": "SPARSE_CSR", "dense_size": 0, "segments": segments, "indices": indices})
    dims += [{"format": "DENSE", "dense_size": block[i]} for i in blocked]
    sparsity = {"traversal_order": list(range(n + len(blocked))), "block_map": blocked, "dim_metadata": dims}
    return blocks[keep].reshape(-1), sparsity


@dataclass
class _Tensor:
    name: str
    shape: list[int]
    dtype: str = "float32"
    data: bytes | None = None
    sparsity: dict | None = None
    signature: list[int] | None = None


@dataclass
class _Operator:
    code: int | str                      # builtin code, or the custom op's name
    inputs: list[int]
    outputs: list[int]
    options_type: int = 0
    options: dict = field(default_factory=dict)   # the options table's fields, e.g. {"StrideW": 2}


class TfliteBuilder:
    """Collects tensors and ops of one subgraph and serialises them as a TFLite flatbuffer."""

    def __init__(self, weights: str = "fp32", seed: int = 0):
        if weights not in ("fp32", "fp16"):
            raise ValueError(f"weights must be 'fp32' or 'fp16', not {weights!r}")
        self.weights = weights
        self.rng = np.random.default_rng(seed)
        self.tensors: list[_Tensor] = []
        self.ops: list[_Operator] = []
        self.inputs: list[int] = []
        self.outputs: list[int] = []

    # ---- tensors -------------------------------------------------------------------------------
    def _tensor(self, name: str, shape, dtype="float32", **kw) -> int:
        names = {t.name for t in self.tensors}
        base, k = name, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        self.tensors.append(_Tensor(name, [int(d) for d in shape], dtype, **kw))
        return len(self.tensors) - 1

    def shape(self, t: int) -> list[int]:
        return list(self.tensors[t].shape)

    def input(self, shape, name: str = "input", signature: list[int] | None = None) -> int:
        """A float32 graph input; `signature` (e.g. [-1, 96, 96, 3]) marks dynamic dimensions."""
        t = self._tensor(name, shape, signature=signature)
        self.inputs.append(t)
        return t

    def output(self, t: int) -> int:
        self.outputs.append(t)
        return t

    def const(self, value: np.ndarray, name: str, dtype: str = "float32") -> int:
        """A constant stored as is (shapes, axes, or float32 values)."""
        value = np.ascontiguousarray(value, dtype=dtype)
        return self._tensor(name, value.shape, dtype, data=value.tobytes())

    def weight(self, value: np.ndarray, name: str, sparse: str | None = None, block_axis: int = 0) -> int:
        """A float32 weight as the model will see it, stored as this builder's `weights` say.

        fp16: stored float16 and a DEQUANTIZE makes the float32 tensor. sparse ("csr" or
        "block4x1", blocks of 4 along `block_axis`): stored with SparsityParameters and a DENSIFY
        makes the dense tensor (sparse fp16: DENSIFY then DEQUANTIZE).
        """
        value = np.asarray(value, np.float32)
        fp16 = self.weights == "fp16"
        dtype = "float16" if fp16 else "float32"
        stored = value.astype(dtype)
        if sparse is None:
            t = self._tensor(name + ("_fp16" if fp16 else ""), value.shape, dtype, data=stored.tobytes())
        else:
            if sparse not in _SPARSE_BLOCKS:
                raise ValueError(f"sparse must be one of {sorted(_SPARSE_BLOCKS)}, not {sparse!r}")
            block = None
            if _SPARSE_BLOCKS[sparse]:
                block = [1] * value.ndim
                block[block_axis] = _SPARSE_BLOCKS[sparse]
            values, sparsity = encode_sparse(stored, block)
            src = self._tensor(name + ("_fp16" if fp16 else "") + "_sparse", value.shape, dtype,
                               data=values.astype(dtype).tobytes(), sparsity=sparsity)
            t = self._tensor(name + ("_fp16" if fp16 else ""), value.shape, dtype)
            self.ops.append(_Operator(_Op.DENSIFY, [src], [t], _Opt.DensifyOptions))
        if fp16:
            out = self._tensor(name, value.shape)
            self.ops.append(_Operator(_Op.DEQUANTIZE, [t], [out], _Opt.DequantizeOptions))
            t = out
        return t

    def _op(self, code, inputs, out_shape, name, options_type=0, **options) -> int:
        out = self._tensor(name, out_shape)
        self.ops.append(_Operator(code, list(inputs), [out], options_type, options))
        return out

    # ---- layers --------------------------------------------------------------------------------
    def conv2d(self, x: int, weight: np.ndarray, bias: np.ndarray, stride: int = 1, padding: str = "SAME",
               act: str = "NONE", sparse: str | None = None, name: str = "conv") -> int:
        """NHWC conv with OHWI weights and a bias."""
        n, h, w, _ = self.shape(x)
        o, kh, kw, _ = weight.shape
        oh, ow = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
        wt = self.weight(weight, f"{name}/weights", sparse, block_axis=0)
        bt = self.weight(bias, f"{name}/bias")
        return self._op(_Op.CONV_2D, [x, wt, bt], [n, oh, ow, o], name, _Opt.Conv2DOptions,
                        Padding=_PADS[padding], StrideW=stride, StrideH=stride,
                        FusedActivationFunction=_ACTS[act], DilationWFactor=1, DilationHFactor=1)

    def depthwise_conv2d(self, x: int, weight: np.ndarray, bias: np.ndarray, stride: int = 1,
                         padding: str = "SAME", act: str = "NONE", sparse: str | None = None,
                         name: str = "dwconv") -> int:
        """NHWC depthwise conv with 1HWO weights (depth multiplier 1) and a bias."""
        n, h, w, c = self.shape(x)
        _, kh, kw, o = weight.shape
        if o != c:
            raise ValueError("only depth_multiplier 1 is supported")
        oh, ow = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
        wt = self.weight(weight, f"{name}/weights", sparse, block_axis=3)
        bt = self.weight(bias, f"{name}/bias")
        return self._op(_Op.DEPTHWISE_CONV_2D, [x, wt, bt], [n, oh, ow, o], name, _Opt.DepthwiseConv2DOptions,
                        Padding=_PADS[padding], StrideW=stride, StrideH=stride, DepthMultiplier=1,
                        FusedActivationFunction=_ACTS[act], DilationWFactor=1, DilationHFactor=1)

    def add(self, a: int, b: int, act: str = "NONE", name: str = "add") -> int:
        return self._op(_Op.ADD, [a, b], self.shape(a), name, _Opt.AddOptions, FusedActivationFunction=_ACTS[act])

    def mean_hw(self, x: int, name: str = "mean") -> int:
        """Mean over H and W with keep_dims: [N, H, W, C] -> [N, 1, 1, C]."""
        n, _, _, c = self.shape(x)
        axes = self.const(np.array([1, 2]), f"{name}/axes", "int32")
        return self._op(_Op.MEAN, [x, axes], [n, 1, 1, c], name, _Opt.ReducerOptions, KeepDims=True)

    def fully_connected(self, x: int, weight: np.ndarray, bias: np.ndarray, act: str = "NONE",
                        sparse: str | None = None, name: str = "fc") -> int:
        """[N, ..., I] x [O, I]^T + bias -> [N*.../I, O]."""
        o, i = weight.shape
        rows = int(np.prod(self.shape(x))) // i
        wt = self.weight(weight, f"{name}/weights", sparse, block_axis=0)
        bt = self.weight(bias, f"{name}/bias")
        return self._op(_Op.FULLY_CONNECTED, [x, wt, bt], [rows, o], name, _Opt.FullyConnectedOptions,
                        FusedActivationFunction=_ACTS[act], KeepNumDims=False)

    def reshape(self, x: int, shape: list[int], name: str = "reshape") -> int:
        st = self.const(np.array(shape), f"{name}/shape", "int32")
        return self._op(_Op.RESHAPE, [x, st], shape, name, _Opt.ReshapeOptions, NewShape=list(shape))

    def softmax(self, x: int, beta: float = 1.0, name: str = "softmax") -> int:
        return self._op(_Op.SOFTMAX, [x], self.shape(x), name, _Opt.SoftmaxOptions, Beta=beta)

    def hard_swish(self, x: int, name: str = "hard_swish") -> int:
        return self._op(_Op.HARD_SWISH, [x], self.shape(x), name)

    def custom(self, x: int, code: str, name: str = "custom") -> int:
        """A CUSTOM op with the given name, output shaped like its input."""
        return self._op(code, [x], self.shape(x), name)

    # ---- serialisation -------------------------------------------------------------------------
    def finish(self) -> bytes:
        """The model as TFLite flatbuffer bytes (file identifier TFL3, schema version 3)."""
        outputs = self.outputs or [self.ops[-1].outputs[0]]
        b = flatbuffers.Builder(1024)
        buffers = [_table(b, "Buffer")]              # buffer 0: the empty sentinel
        tensors = []
        for t in self.tensors:
            buf = 0
            if t.data is not None:
                buffers.append(_table(b, "Buffer", Data=_bytes_vector(b, t.data)))
                buf = len(buffers) - 1
            sparsity = _sparsity(b, t.sparsity) if t.sparsity else None
            sig = _ints(b, t.signature) if t.signature else None
            tensors.append(_table(b, "Tensor", Shape=_ints(b, t.shape), Type=_TYPES[t.dtype], Buffer=buf,
                                  Name=b.CreateString(t.name), Sparsity=sparsity, ShapeSignature=sig))
        codes: list[int | str] = []
        ops = []
        for op in self.ops:
            if op.code not in codes:
                codes.append(op.code)
            opts = _table(b, _option_name(op.options_type), **op.options) if op.options_type else None
            ops.append(_table(b, "Operator", OpcodeIndex=codes.index(op.code), Inputs=_ints(b, op.inputs),
                              Outputs=_ints(b, op.outputs), BuiltinOptionsType=op.options_type,
                              BuiltinOptions=opts))
        graph = _table(b, "SubGraph", Tensors=_offsets(b, "SubGraph", "Tensors", tensors),
                       Inputs=_ints(b, self.inputs), Outputs=_ints(b, outputs),
                       Operators=_offsets(b, "SubGraph", "Operators", ops), Name=b.CreateString("main"))
        code_tables = []
        for code in codes:
            if isinstance(code, str):
                code_tables.append(_table(b, "OperatorCode", CustomCode=b.CreateString(code), Version=1,
                                          DeprecatedBuiltinCode=_Op.CUSTOM, BuiltinCode=_Op.CUSTOM))
            else:
                code_tables.append(_table(b, "OperatorCode", DeprecatedBuiltinCode=min(code, 127),
                                          BuiltinCode=code, Version=1))
        model = _table(b, "Model", Version=3,
                       OperatorCodes=_offsets(b, "Model", "OperatorCodes", code_tables),
                       Subgraphs=_offsets(b, "Model", "Subgraphs", [graph]),
                       Description=b.CreateString("shrinkc zoo.tflite_writer"),
                       Buffers=_offsets(b, "Model", "Buffers", buffers))
        b.Finish(model, file_identifier=b"TFL3")
        return bytes(b.Output())


def _out_size(size: int, k: int, stride: int, padding: str) -> int:
    return math.ceil(size / stride) if padding == "SAME" else math.ceil((size - k + 1) / stride)


def _option_name(options_type: int) -> str:
    return next(k for k, v in vars(_Opt).items() if v == options_type)


def _table(b: flatbuffers.Builder, kind: str, **fields) -> int:
    """One table built with the generated tflite.<kind>Start / <kind>Add<Field> / <kind>End functions."""
    getattr(tflite, f"{kind}Start")(b)
    for name, value in fields.items():
        if value is not None:
            getattr(tflite, f"{kind}Add{name}")(b, value)
    return getattr(tflite, f"{kind}End")(b)


def _ints(b: flatbuffers.Builder, values, dtype=np.int32) -> int:
    return b.CreateNumpyVector(np.asarray(list(values), dtype=dtype))


def _offsets(b: flatbuffers.Builder, kind: str, name: str, offsets: list[int]) -> int:
    getattr(tflite, f"{kind}Start{name}Vector")(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _bytes_vector(b: flatbuffers.Builder, data: bytes) -> int:
    """A [ubyte] vector whose payload starts 16-byte aligned, as TFLite's converter writes buffers."""
    b.StartVector(1, len(data), 16)
    b.head = b.head - len(data)
    b.Bytes[b.head:b.head + len(data)] = data
    return b.EndVector()


def _index_vector(b: flatbuffers.Builder, values: np.ndarray) -> tuple[int, int]:
    """A SparseIndexVector union (type, table) in the smallest integer type holding the values."""
    top = int(values.max()) if values.size else 0
    for kind, dtype, limit in (("Uint8Vector", np.uint8, 255), ("Uint16Vector", np.uint16, 65535),
                               ("Int32Vector", np.int32, 2**31 - 1)):
        if top <= limit:
            vec = _ints(b, values, dtype)
            return getattr(tflite.SparseIndexVector, kind), _table(b, kind, Values=vec)
    raise ValueError("sparse index too large")


def _sparsity(b: flatbuffers.Builder, sp: dict) -> int:
    dims = []
    for d in sp["dim_metadata"]:
        fields = {"Format": getattr(tflite.DimensionType, d["format"]), "DenseSize": d["dense_size"]}
        if d["format"] == "SPARSE_CSR":
            fields["ArraySegmentsType"], fields["ArraySegments"] = _index_vector(b, d["segments"])
            fields["ArrayIndicesType"], fields["ArrayIndices"] = _index_vector(b, d["indices"])
        dims.append(_table(b, "DimensionMetadata", **fields))
    block_map = _ints(b, sp["block_map"]) if sp["block_map"] else None
    return _table(b, "SparsityParameters", TraversalOrder=_ints(b, sp["traversal_order"]), BlockMap=block_map,
                  DimMetadata=_offsets(b, "SparsityParameters", "DimMetadata", dims))


# ---- models --------------------------------------------------------------------------------------
def _prune(w: np.ndarray, sparsity: float, block: int, axis: int = 0) -> np.ndarray:
    """Zero the `sparsity` share of weights (or of `block`-long runs along `axis`) with the smallest
    magnitude, and rescale the rest to the original norm."""
    if sparsity <= 0:
        return w
    moved = np.moveaxis(w, axis, 0)
    groups = moved.reshape(moved.shape[0] // block, block, -1)
    score = np.abs(groups).sum(axis=1)                       # one score per block
    k = int(round(sparsity * score.size))
    mask = np.ones(score.size, bool)
    mask[np.argsort(score, axis=None, kind="stable")[:k]] = False
    pruned = groups * mask.reshape(score.shape)[:, None, :]
    pruned *= np.linalg.norm(groups) / max(np.linalg.norm(pruned), 1e-12)   # keep activations alive
    return np.moveaxis(pruned.reshape(moved.shape), 0, axis).astype(np.float32)


def mobilenet_v2_tflite(width: float = 0.35, resolution: int = 96, sparsity: float = 0.0,
                        weights: str = "fp32", sparse_format: str = "csr", seed: int = 0,
                        num_classes: int = 1000, num_blocks: int | None = None,
                        store_sparse: bool = True) -> bytes:
    """MobileNetV2 (NHWC, folded BN, random weights) as TFLite bytes.

    sparsity: share of zeros in every 1x1 conv and the classifier, pruned by magnitude per element
    ("csr") or per 4 output channels ("block4x1"); such weights are stored sparse + DENSIFY unless
    store_sparse is False (same numbers, stored dense: the reference for the sparse model).
    weights: "fp32" or "fp16" (float16 storage + DEQUANTIZE). The same seed gives the same weights
    whatever the storage. num_blocks: keep only the first inverted residual blocks (for small tests).
    """
    if sparse_format not in _SPARSE_BLOCKS:
        raise ValueError(f"sparse_format must be one of {sorted(_SPARSE_BLOCKS)}")
    block = _SPARSE_BLOCKS[sparse_format] or 1
    sparse = sparse_format if sparsity > 0 and store_sparse else None
    b = TfliteBuilder(weights, seed)
    rng = b.rng

    def params(o, kh, kw, i, prune=False):
        w = (rng.standard_normal((o, kh, kw, i)) * math.sqrt(2.0 / (kh * kw * i))).astype(np.float32)
        bias = (rng.standard_normal(o) * 0.05).astype(np.float32)
        return (_prune(w, sparsity, block) if prune else w), bias

    x = b.input([1, resolution, resolution, 3])
    cin = make_divisible(32 * width)
    x = b.conv2d(x, *params(cin, 3, 3, 3), stride=2, act="RELU6", name="stem")
    blocks = [(t, c, s if i == 0 else 1) for t, c, n, s in _BLOCKS for i in range(n)]
    for k, (t, c, stride) in enumerate(blocks[:num_blocks]):
        cout, hidden, y = make_divisible(c * width), cin * t, x
        if t != 1:
            y = b.conv2d(y, *params(hidden, 1, 1, cin, True), act="RELU6", sparse=sparse, name=f"block{k}/expand")
        w = (rng.standard_normal((1, 3, 3, hidden)) * math.sqrt(2.0 / 9)).astype(np.float32)
        bias = (rng.standard_normal(hidden) * 0.05).astype(np.float32)
        y = b.depthwise_conv2d(y, w, bias, stride, act="RELU6", name=f"block{k}/dw")
        y = b.conv2d(y, *params(cout, 1, 1, hidden, True), sparse=sparse, name=f"block{k}/project")
        if stride == 1 and cin == cout:
            y = b.add(y, x, name=f"block{k}/add")
        x, cin = y, cout
    head = make_divisible(1280 * width) if width > 1.0 else 1280
    x = b.conv2d(x, *params(head, 1, 1, cin, True), act="RELU6", sparse=sparse, name="head")
    x = b.mean_hw(x, name="pool")
    w, bias = params(num_classes, 1, 1, head, True)
    x = b.fully_connected(x, w.reshape(num_classes, head), bias, sparse=sparse, name="classifier")
    b.output(b.softmax(x, name="probs"))
    return b.finish()


def custom_op_tflite(code: str = "ShrinkcTestOp") -> bytes:
    """A small conv model with one CUSTOM op in the middle (LiteRT and importers must reject it)."""
    b = TfliteBuilder()
    x = b.input([1, 8, 8, 3])
    w = b.rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    x = b.conv2d(x, w, np.zeros(4, np.float32), act="RELU")
    x = b.custom(x, code, name="custom")
    b.output(b.hard_swish(x))
    return b.finish()
