"""Write .tflite files from code (no TensorFlow): plain fp32, fp16 + DEQUANTIZE, int8 (dynamic-range quantized) and
sparse + DENSIFY weights."""
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
_TYPES = {"float32": TensorType.FLOAT32, "float16": TensorType.FLOAT16, "int32": TensorType.INT32,
          "int8": TensorType.INT8, "uint8": TensorType.UINT8, "bool": TensorType.BOOL}
_WEIGHTS = ("fp32", "fp16", "int8")
_SPARSE_BLOCKS = {"csr": None, "block4x1": 4}  # block4x1: blocks of 4 output channels x 1
_OPTION_NAMES = {v: k for k, v in vars(_Opt).items() if not k.startswith("_")}


def encode_sparse(dense: np.ndarray, block: tuple[int, ...] | None = None, order: list[int] | None = None,
                  formats: list[str] | None = None) -> tuple[np.ndarray, dict]:
    """Dense array -> (stored values, sparsity dict) in TFLite's sparse layout.

    The tensor is seen with n + k dimensions: its own n (each divided by its block size) and one
    block dimension per block size > 1. By default (as TFLite's sparsity converter emits it) the
    traversal order is the identity and every level is DENSE except the last own dimension, which
    is SPARSE_CSR; `order` and `formats` (per level, "DENSE" / "SPARSE_CSR") override that. A CSR
    level keeps the coordinates under which anything is non-zero (zeros inside kept blocks stay).
    """
    n = dense.ndim
    block = tuple(block) if block else (1,) * n
    if len(block) != n or any(s % b for s, b in zip(dense.shape, block)):
        raise ValueError(f"block {block} does not tile shape {dense.shape}")
    blocked = [i for i in range(n) if block[i] != 1]
    outer = [s // b for s, b in zip(dense.shape, block)]
    t = dense.reshape([x for pair in zip(outer, block) for x in pair])
    t = t.transpose([2 * i for i in range(n)] + [2 * i + 1 for i in blocked] +
                    [2 * i + 1 for i in range(n) if i not in blocked])
    expanded = t.reshape(outer + [block[i] for i in blocked])
    order = list(order) if order is not None else list(range(n + len(blocked)))
    formats = formats or ["DENSE"] * (n - 1) + ["SPARSE_CSR"] + ["DENSE"] * len(blocked)
    levels = expanded.transpose(order)
    nonzero = levels != 0
    coords = np.zeros((1, 0), np.int64)            # one row per position reached so far
    dims = []
    for level, fmt in enumerate(formats):
        size = levels.shape[level]
        cand = np.concatenate([np.repeat(coords, size, axis=0),
                               np.tile(np.arange(size), len(coords))[:, None]], axis=1)
        if fmt == "DENSE":
            dims.append({"format": "DENSE", "dense_size": size})
            coords = cand
            continue
        below = nonzero.reshape(levels.shape[:level + 1] + (-1,)).any(axis=-1)
        keep = below[tuple(cand.T)]
        counts = keep.reshape(len(coords), size).sum(axis=1)
        dims.append({"format": "SPARSE_CSR", "dense_size": 0, "segments": np.concatenate([[0], np.cumsum(counts)]),
                     "indices": cand[keep, -1]})
        coords = cand[keep]
    sparsity = {"traversal_order": order, "block_map": blocked, "dim_metadata": dims}
    return levels[tuple(coords.T)], sparsity


@dataclass
class _Tensor:
    """One subgraph tensor; `data` for constants, `sparsity` as encode_sparse returns it."""

    name: str
    shape: list[int]
    dtype: str = "float32"
    data: bytes | None = None
    sparsity: dict | None = None
    signature: list[int] | None = None
    quant: dict | None = None          # {"scale": per-channel scales, "axis": their axis, "zero": zero points (0)}


@dataclass
class _Operator:
    """One op: builtin code or custom name, tensor indices and its options table's fields."""

    code: int | str                      # builtin code, or the custom op's name
    inputs: list[int]
    outputs: list[int]
    options_type: int = 0
    options: dict = field(default_factory=dict)   # the options table's fields, e.g. {"StrideW": 2}
    custom_options: bytes | None = None          # a custom op's options (a flexbuffer)
    version: int = 1                             # its op code's version


class TfliteBuilder:
    """Collects tensors and ops of one subgraph and serialises them as a TFLite flatbuffer."""

    def __init__(self, weights: str = "fp32", seed: int = 0, store_int8: bool = True):
        if weights not in _WEIGHTS:
            raise ValueError(f"weights must be one of {_WEIGHTS}, not {weights!r}")
        self.weights, self.store_int8 = weights, store_int8   # int8 with store_int8 False: float32 of the same values
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

    def weight(self, value: np.ndarray, name: str, sparse: str | dict | None = None, block_axis: int = 0,
               densify: bool = True, quantize: bool = True) -> int:
        """A float32 weight as the model will see it, stored as this builder's `weights` say.

        fp16: stored float16 and a DEQUANTIZE makes the float32 tensor. int8 (with quantize; biases are not):
        TFLite's dynamic-range quantization, symmetric per channel along `block_axis` (the output channels),
        read by the op itself as int8 (int8_per_channel gives the values it stands for). sparse ("csr" or
        "block4x1", blocks of 4 along `block_axis`, or a dict of encode_sparse keywords): stored
        with SparsityParameters and a DENSIFY makes the dense tensor (sparse fp16: DENSIFY, DEQUANTIZE);
        densify=False hands the sparse tensor to the op itself, as TFLite does for sparse FC kernels.
        """
        value = np.asarray(value, np.float32)
        fp16, quant = self.weights == "fp16", None
        dtype, stored_name = ("float16", name + "_fp16") if fp16 else ("float32", name)
        stored = value.astype(dtype)
        if self.weights == "int8" and quantize:
            stored, scale, along = int8_per_channel(value, block_axis)
            if self.store_int8:
                dtype, quant = "int8", {"scale": scale, "axis": block_axis}
            else:
                stored = stored.astype(np.float32) * along
        if sparse is None:
            t = self._tensor(stored_name, value.shape, dtype, data=stored.tobytes(), quant=quant)
        else:
            if not isinstance(sparse, dict) and sparse not in _SPARSE_BLOCKS:
                raise ValueError(f"sparse must be one of {sorted(_SPARSE_BLOCKS)} or a dict, not {sparse!r}")
            block = [1] * value.ndim
            if not isinstance(sparse, dict):
                block[block_axis] = _SPARSE_BLOCKS[sparse] or 1
            values, sparsity = encode_sparse(stored, **(sparse if isinstance(sparse, dict) else {"block": block}))
            t = self._tensor(stored_name + "_sparse", value.shape, dtype, data=values.tobytes(), sparsity=sparsity,
                             quant=quant)
            if densify:
                t = self._op(_Op.DENSIFY, [t], value.shape, stored_name, _Opt.DensifyOptions, dtype=dtype)
                self.tensors[t].quant = quant
        if fp16:
            t = self._op(_Op.DEQUANTIZE, [t], value.shape, name, _Opt.DequantizeOptions)
        return t

    def _op(self, code, inputs, out_shape, name, options_type=0, dtype="float32", **options) -> int:
        out = self._tensor(name, out_shape, dtype)
        self.ops.append(_Operator(code, list(inputs), [out], options_type, options))
        return out

    # ---- layers (weights: an ndarray, or a tensor made with weight()) -------------------------------
    def _weights(self, weight, bias, name: str, sparse, axis: int) -> tuple[int, int, list[int]]:
        wt = weight if isinstance(weight, int) else self.weight(weight, f"{name}/weights", sparse, block_axis=axis)
        return wt, self.weight(bias, f"{name}/bias", quantize=False), self.shape(wt)

    def conv2d(self, x: int, weight, bias: np.ndarray, stride: int = 1, padding: str = "SAME",
               act: str = "NONE", sparse: str | dict | None = None, name: str = "conv") -> int:
        """NHWC conv with OHWI weights and a bias."""
        return self._conv(_Op.CONV_2D, _Opt.Conv2DOptions, x, weight, bias, stride, padding, act, sparse, name, 0)

    def depthwise_conv2d(self, x: int, weight, bias: np.ndarray, stride: int = 1, padding: str = "SAME",
                         act: str = "NONE", sparse: str | dict | None = None, name: str = "dwconv") -> int:
        """NHWC depthwise conv with 1HWO weights (depth multiplier 1) and a bias."""
        return self._conv(_Op.DEPTHWISE_CONV_2D, _Opt.DepthwiseConv2DOptions, x, weight, bias, stride, padding,
                          act, sparse, name, 3, DepthMultiplier=1)

    def _conv(self, code, options_type, x, weight, bias, stride, padding, act, sparse, name, axis, **extra) -> int:
        n, h, w, c = self.shape(x)
        wt, bt, shape = self._weights(weight, bias, name, sparse, axis)
        if code == _Op.DEPTHWISE_CONV_2D and shape[3] != c:
            raise ValueError("only depth_multiplier 1 is supported")
        oh, ow = _out_size(h, shape[1], stride, padding), _out_size(w, shape[2], stride, padding)
        return self._op(code, [x, wt, bt], [n, oh, ow, shape[axis]], name, options_type, Padding=_PADS[padding],
                        StrideW=stride, StrideH=stride, FusedActivationFunction=_ACTS[act],
                        DilationWFactor=1, DilationHFactor=1, **extra)

    def transpose_conv(self, x: int, weight: np.ndarray, bias: np.ndarray, stride: int = 2, padding: str = "SAME",
                       name: str = "upconv") -> int:
        """NHWC transposed conv with OHWI weights ([Cout, kh, kw, Cin]) and a bias: out = in x stride (SAME) or
        (in - 1) x stride + k (VALID), as TRANSPOSE_CONV takes them (output shape, weights, input, bias)."""
        n, h, w, _ = self.shape(x)
        cout, kh, kw, _ = weight.shape
        oh, ow = (h * stride, w * stride) if padding == "SAME" else ((h - 1) * stride + kh, (w - 1) * stride + kw)
        shape = self.const(np.array([n, oh, ow, cout]), f"{name}/output_shape", "int32")
        wt, bt = self.weight(weight, f"{name}/weights"), self.weight(bias, f"{name}/bias", quantize=False)
        return self._op(_Op.TRANSPOSE_CONV, [shape, wt, x, bt], [n, oh, ow, cout], name, _Opt.TransposeConvOptions,
                        Padding=_PADS[padding], StrideW=stride, StrideH=stride)

    def transpose_conv_bias(self, x: int, weight: np.ndarray, bias: np.ndarray, stride: int = 2,
                            padding: str = "SAME", name: str = "upconv") -> int:
        """MediaPipe's custom op Convolution2DTransposeBias: transpose_conv's computation, its inputs (input, OHWI
        weights, bias) and its options the raw C struct {int32 padding (1 SAME, 2 VALID), stride_w, stride_h}."""
        n, h, w, _ = self.shape(x)
        cout, kh, kw, _ = weight.shape
        oh, ow = (h * stride, w * stride) if padding == "SAME" else ((h - 1) * stride + kh, (w - 1) * stride + kw)
        wt, bt = self.weight(weight, f"{name}/weights"), self.weight(bias, f"{name}/bias", quantize=False)
        out = self._tensor(name, [n, oh, ow, cout])
        options = np.array([1 if padding == "SAME" else 2, stride, stride], "<i4").tobytes()
        self.ops.append(_Operator("Convolution2DTransposeBias", [x, wt, bt], [out], custom_options=options))
        return out

    def max_pool_argmax(self, x: int, k: int = 2, padding: str = "VALID", name: str = "pool") -> tuple[int, int]:
        """MediaPipe's custom op MaxPoolingWithArgmax2D, a k x k window of stride k: (maxima, where each was; float32)
        with its options the raw C struct TfLitePoolParams {int32 padding (1 SAME, 2 VALID), stride_w, stride_h,
        filter_w, filter_h, activation, computed padding x 4}."""
        n, h, w, c = self.shape(x)
        oh, ow = (-(-h // k), -(-w // k)) if padding == "SAME" else (h // k, w // k)
        out = [self._tensor(name, [n, oh, ow, c]), self._tensor(f"{name}/indices", [n, oh, ow, c])]
        self.ops.append(_Operator("MaxPoolingWithArgmax2D", [x], out, custom_options=_pool_params(k, padding)))
        return out[0], out[1]

    def max_unpool(self, x: int, indices: int, k: int = 2, name: str = "unpool") -> int:
        """MediaPipe's custom op MaxUnpooling2D: x back at the window positions `indices` name (k x k, stride k)."""
        n, h, w, c = self.shape(x)
        out = self._tensor(name, [n, h * k, w * k, c])
        self.ops.append(_Operator("MaxUnpooling2D", [x, indices], [out], custom_options=_pool_params(k, "VALID")))
        return out

    def prelu(self, x: int, slope: np.ndarray, name: str = "prelu") -> int:
        """PRELU with a constant slope broadcast against x (Keras: [1, 1, C], shared over H and W)."""
        st = self.const(slope.astype(np.float32), f"{name}/alpha")
        return self._op(_Op.PRELU, [x, st], self.shape(x), name)

    def add(self, a: int, b: int, act: str = "NONE", name: str = "add") -> int:
        return self._op(_Op.ADD, [a, b], self.shape(a), name, _Opt.AddOptions, FusedActivationFunction=_ACTS[act])

    def mean_hw(self, x: int, name: str = "mean", keep_dims: bool = True) -> int:
        """Mean over H and W: [N, H, W, C] -> [N, 1, 1, C], or [N, C] without keep_dims (as the converter writes
        a Keras squeeze-and-excite's GlobalAveragePooling2D)."""
        n, _, _, c = self.shape(x)
        axes = self.const(np.array([1, 2]), f"{name}/axes", "int32")
        return self._op(_Op.MEAN, [x, axes], [n, 1, 1, c] if keep_dims else [n, c], name, _Opt.ReducerOptions,
                        KeepDims=keep_dims)

    def mul(self, a: int, b: int, name: str = "mul") -> int:
        return self._op(_Op.MUL, [a, b], self.shape(a), name, _Opt.MulOptions, FusedActivationFunction=_ACTS["NONE"])

    def logistic(self, x: int, name: str = "logistic") -> int:
        return self._op(_Op.LOGISTIC, [x], self.shape(x), name)

    def fully_connected(self, x: int, weight, bias: np.ndarray, act: str = "NONE",
                        sparse: str | dict | None = None, name: str = "fc") -> int:
        """[N, ..., I] x [O, I]^T + bias -> [N*.../I, O]."""
        wt, bt, (o, i) = self._weights(weight, bias, name, sparse, 0)
        rows = int(np.prod(self.shape(x))) // i
        return self._op(_Op.FULLY_CONNECTED, [x, wt, bt], [rows, o], name, _Opt.FullyConnectedOptions,
                        FusedActivationFunction=_ACTS[act], KeepNumDims=False)

    def reshape(self, x: int, shape: list[int], name: str = "reshape") -> int:
        st = self.const(np.array(shape), f"{name}/shape", "int32")
        return self._op(_Op.RESHAPE, [x, st], shape, name, _Opt.ReshapeOptions, NewShape=list(shape))

    def reshape_keep_batch(self, x: int, rest: list[int], name: str = "reshape") -> int:
        """Reshape to [batch, *rest] with the batch read at run time, as converters write it for a
        dynamic batch: SHAPE -> STRIDED_SLICE -> PACK -> RESHAPE."""
        rank = len(self.shape(x))
        shape = self._op(_Op.SHAPE, [x], [rank], f"{name}/shape", _Opt.ShapeOptions, "int32", OutType=_TYPES["int32"])
        one = self.const(np.array([1]), f"{name}/one", "int32")
        zero = self.const(np.array([0]), f"{name}/zero", "int32")
        batch = self._op(_Op.STRIDED_SLICE, [shape, zero, one, one], [], f"{name}/batch",
                         _Opt.StridedSliceOptions, "int32", ShrinkAxisMask=1)
        dims = [self._tensor(f"{name}/dim{i}", [], "int32", data=np.int32(d).tobytes()) for i, d in enumerate(rest)]
        new_shape = self._op(_Op.PACK, [batch, *dims], [1 + len(rest)], f"{name}/new_shape", _Opt.PackOptions,
                             "int32", ValuesCount=1 + len(rest), Axis=0)
        out = self._op(_Op.RESHAPE, [x, new_shape], [self.shape(x)[0], *rest], name, _Opt.ReshapeOptions,
                       self.tensors[x].dtype)
        self.tensors[out].signature = [-1, *rest]
        self.tensors[out].quant = self.tensors[x].quant
        return out

    def quantize(self, x: int, scale: float, name: str = "quantize") -> int:
        """x as int8 with one scale (zero point 0), as an integer-quantized model holds its activations."""
        q = self._op(_Op.QUANTIZE, [x], self.shape(x), name, _Opt.QuantizeOptions, "int8")
        self.tensors[q].quant = {"scale": np.array([scale], np.float32), "axis": 0}
        return q

    def dequantize(self, q: int, name: str = "dequantize") -> int:
        return self._op(_Op.DEQUANTIZE, [q], self.shape(q), name, _Opt.DequantizeOptions)

    def softmax(self, x: int, beta: float = 1.0, name: str = "softmax") -> int:
        return self._op(_Op.SOFTMAX, [x], self.shape(x), name, _Opt.SoftmaxOptions, Beta=beta)

    def hard_swish(self, x: int, name: str = "hard_swish") -> int:
        return self._op(_Op.HARD_SWISH, [x], self.shape(x), name)

    def resize(self, x: int, size: tuple[int, int], method: str = "bilinear", align_corners: bool = False,
               half_pixel_centers: bool = False, name: str = "resize") -> int:
        """RESIZE_BILINEAR or RESIZE_NEAREST_NEIGHBOR of an NHWC tensor to `size` (H, W)."""
        n, _, _, c = self.shape(x)
        st = self.const(np.array(size), f"{name}/size", "int32")
        code, opt = ((_Op.RESIZE_BILINEAR, _Opt.ResizeBilinearOptions) if method == "bilinear"
                     else (_Op.RESIZE_NEAREST_NEIGHBOR, _Opt.ResizeNearestNeighborOptions))
        return self._op(code, [x, st], [n, *size, c], name, opt, AlignCorners=align_corners,
                        HalfPixelCenters=half_pixel_centers)

    def concat(self, xs: list[int], axis: int = 3, name: str = "concat") -> int:
        shape = self.shape(xs[0])
        shape[axis] = sum(self.shape(x)[axis] for x in xs)
        return self._op(_Op.CONCATENATION, xs, shape, name, _Opt.ConcatenationOptions, Axis=axis,
                        FusedActivationFunction=_ACTS["NONE"])

    def pool(self, x: int, kind: str = "max", size: int = 2, stride: int = 2, padding: str = "VALID",
             name: str = "pool") -> int:
        """MAX_POOL_2D or AVERAGE_POOL_2D (NHWC)."""
        n, h, w, c = self.shape(x)
        code = _Op.MAX_POOL_2D if kind == "max" else _Op.AVERAGE_POOL_2D
        return self._op(code, [x], [n, _out_size(h, size, stride, padding), _out_size(w, size, stride, padding), c],
                        name, _Opt.Pool2DOptions, Padding=_PADS[padding], StrideW=stride, StrideH=stride,
                        FilterWidth=size, FilterHeight=size, FusedActivationFunction=_ACTS["NONE"])

    def pad(self, x: int, pads: list[list[int]], name: str = "pad") -> int:
        """PAD with zeros; pads [[before, after]] per axis."""
        pt = self.const(np.array(pads), f"{name}/paddings", "int32")
        shape = [d + a + b for d, (a, b) in zip(self.shape(x), pads)]
        return self._op(_Op.PAD, [x, pt], shape, name, _Opt.PadOptions)

    def depth_to_space(self, x: int, block: int, name: str = "depth_to_space") -> int:
        n, h, w, c = self.shape(x)
        return self._op(_Op.DEPTH_TO_SPACE, [x], [n, h * block, w * block, c // (block * block)], name,
                        _Opt.DepthToSpaceOptions, BlockSize=block)

    def tanh(self, x: int, name: str = "tanh") -> int:
        return self._op(_Op.TANH, [x], self.shape(x), name)

    def expand_dims(self, x: int, axis: int, name: str = "expand_dims") -> int:
        """A unit axis inserted at `axis` (negative: from the end of the output), the axis a scalar int32 tensor."""
        shape = self.shape(x)
        shape.insert(axis + len(shape) + 1 if axis < 0 else axis, 1)
        at = self._tensor(f"{name}/axis", [], "int32", data=np.int32(axis).tobytes())
        return self._op(_Op.EXPAND_DIMS, [x, at], shape, name, _Opt.ExpandDimsOptions)

    def squeeze(self, x: int, dims: list[int], name: str = "squeeze") -> int:
        shape = [d for i, d in enumerate(self.shape(x)) if i not in dims]
        return self._op(_Op.SQUEEZE, [x], shape, name, _Opt.SqueezeOptions, SqueezeDims=list(dims))

    def custom(self, x: int, code: str, name: str = "custom") -> int:
        """A CUSTOM op with the given name, output shaped like its input."""
        return self._op(code, [x], self.shape(x), name)

    def mediapipe_geometry(self, code: str, inputs: list[int], shape: list[int], version: int, options: dict,
                           name: str) -> int:
        """One of MediaPipe's geometry custom ops (Landmarks2TransformMatrix, TransformTensorBilinear,
        TransformLandmarks, Resampler) of the given op code version, its options a flexbuffer map (ints, floats,
        strings, and lists of ints as typed vectors), its output shaped `shape`."""
        from flatbuffers import flexbuffers
        fb = flexbuffers.Builder()
        with fb.Map():
            for key, value in options.items():
                if isinstance(value, (list, tuple)):
                    fb.TypedVectorFromElements(key, [int(v) for v in value])
                else:
                    put = fb.String if isinstance(value, str) else fb.Int if isinstance(value, int) else fb.Float
                    put(key, value)
        out = self._tensor(name, shape)
        self.ops.append(_Operator(code, inputs, [out], custom_options=bytes(fb.Finish()), version=version))
        return out

    def detection_postprocess(self, boxes: int, scores: int, anchors: np.ndarray | int, max_detections: int = 10,
                              **options) -> list[int]:
        """TFLite_Detection_PostProcess (the custom op that ends an SSD detector): box encodings [1, N, 4] and class
        scores [1, N, classes + 1] with anchors [N, 4] (y, x, h, w; float32 values, or a tensor made already) ->
        boxes [1, M, 4], classes [1, M], scores [1, M], count [1] (M = max_detections). `options` overrides the
        defaults below (TF's SSD configs')."""
        from flatbuffers import flexbuffers
        opts = {"max_detections": max_detections, "max_classes_per_detection": 1, "detections_per_class": 100,
                "use_regular_nms": False, "nms_score_threshold": 0.3, "nms_iou_threshold": 0.6,
                "num_classes": self.shape(scores)[2] - 1, "y_scale": 10.0, "x_scale": 10.0, "h_scale": 5.0,
                "w_scale": 5.0, **options}
        fb = flexbuffers.Builder()
        with fb.Map():
            for key, value in opts.items():
                (fb.Bool if isinstance(value, bool) else fb.Int if isinstance(value, int) else fb.Float)(key, value)
        m = opts["max_detections"] * opts["max_classes_per_detection"]
        outs = [self._tensor(name, shape) for name, shape in (("detection_boxes", [1, m, 4]),
                                                               ("detection_classes", [1, m]),
                                                               ("detection_scores", [1, m]),
                                                               ("num_detections", [1]))]
        anchors = anchors if isinstance(anchors, int) else self.const(anchors, "anchors")
        self.ops.append(_Operator("TFLite_Detection_PostProcess", [boxes, scores, anchors], outs,
                                  custom_options=bytes(fb.Finish())))
        return outs

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
            quant = None
            if t.quant:
                scale = b.CreateNumpyVector(np.asarray(t.quant["scale"], np.float32))
                zero = _ints(b, t.quant.get("zero", np.zeros(len(t.quant["scale"]))), np.int64)
                quant = _table(b, "QuantizationParameters", Scale=scale, ZeroPoint=zero,
                               QuantizedDimension=t.quant["axis"])
            tensors.append(_table(b, "Tensor", Shape=_ints(b, t.shape), Type=_TYPES[t.dtype], Buffer=buf,
                                  Name=b.CreateString(t.name), Sparsity=sparsity, ShapeSignature=sig,
                                  Quantization=quant))
        codes: list[tuple[int | str, int]] = []
        ops = []
        for op in self.ops:
            if (op.code, op.version) not in codes:
                codes.append((op.code, op.version))
            fields = {k: _ints(b, v) if isinstance(v, list) else v for k, v in op.options.items()}
            opts = _table(b, _OPTION_NAMES[op.options_type], **fields) if op.options_type else None
            custom = _bytes_vector(b, op.custom_options) if op.custom_options is not None else None
            ops.append(_table(b, "Operator", OpcodeIndex=codes.index((op.code, op.version)), Inputs=_ints(b, op.inputs),
                              Outputs=_ints(b, op.outputs), BuiltinOptionsType=op.options_type,
                              BuiltinOptions=opts, CustomOptions=custom))
        graph = _table(b, "SubGraph", Tensors=_offsets(b, "SubGraph", "Tensors", tensors),
                       Inputs=_ints(b, self.inputs), Outputs=_ints(b, outputs),
                       Operators=_offsets(b, "SubGraph", "Operators", ops), Name=b.CreateString("main"))
        code_tables = []
        for code, version in codes:
            builtin, custom = (_Op.CUSTOM, b.CreateString(code)) if isinstance(code, str) else (code, None)
            code_tables.append(_table(b, "OperatorCode", DeprecatedBuiltinCode=min(builtin, 127),
                                      BuiltinCode=builtin, CustomCode=custom, Version=version))
        model = _table(b, "Model", Version=3,
                       OperatorCodes=_offsets(b, "Model", "OperatorCodes", code_tables),
                       Subgraphs=_offsets(b, "Model", "Subgraphs", [graph]),
                       Description=b.CreateString("shrinkc zoo.tflite_writer"),
                       Buffers=_offsets(b, "Model", "Buffers", buffers))
        b.Finish(model, file_identifier=b"TFL3")
        return bytes(b.Output())


def _pool_params(k: int, padding: str) -> bytes:
    """TfLitePoolParams as MediaPipe's pooling ops read their options: a k x k window of stride k, no activation."""
    return np.array([1 if padding == "SAME" else 2, k, k, k, k, 0, 0, 0, 0, 0], "<i4").tobytes()


def _out_size(size: int, k: int, stride: int, padding: str) -> int:
    return math.ceil(size / stride) if padding == "SAME" else math.ceil((size - k + 1) / stride)


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


def int8_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w quantized symmetric per channel along `axis` (the channel's largest magnitude maps to 127): the int8
    values, the [C] scales, and the scales shaped to broadcast along `axis`; values * that is what the model
    computes with."""
    peak = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1)
    scale = (np.maximum(peak, 1e-12) / 127.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    along = scale.reshape(shape)
    return np.clip(np.round(w / along), -127, 127).astype(np.int8), scale, along


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
                        store_sparse: bool = True, store_int8: bool = True) -> bytes:
    """MobileNetV2 (NHWC, folded BN, random weights) as TFLite bytes.

    sparsity: share of zeros in every 1x1 conv and the classifier, pruned by magnitude per element
    ("csr") or per 4 output channels ("block4x1"); such weights are stored sparse + DENSIFY unless
    store_sparse is False (same numbers, stored dense: the reference for the sparse model).
    weights: "fp32", "fp16" (float16 storage + DEQUANTIZE) or "int8" (dynamic-range quantized conv and fully
    connected weights; with store_int8 False stored as the float32 values they stand for, the reference). The same
    seed gives the same weights whatever the storage. num_blocks: keep only the first inverted residual blocks (for small tests).
    """
    if sparse_format not in _SPARSE_BLOCKS:
        raise ValueError(f"sparse_format must be one of {sorted(_SPARSE_BLOCKS)}")
    block = _SPARSE_BLOCKS[sparse_format] or 1
    sparse = sparse_format if sparsity > 0 and store_sparse else None
    b = TfliteBuilder(weights, seed, store_int8)
    rng = b.rng

    def params(o, kh, kw, i, prune=False):
        w = (rng.standard_normal((o, kh, kw, i)) * math.sqrt(2.0 / (kh * kw * i))).astype(np.float32)
        bias = (rng.standard_normal(o) * 0.05).astype(np.float32)
        return (_prune(w, sparsity, block if o % block == 0 else 1) if prune else w), bias

    def fmt(o):  # a layer whose output channels the block does not tile falls back to CSR
        return sparse and (sparse if o % block == 0 else "csr")

    x = b.input([1, resolution, resolution, 3])
    cin = make_divisible(32 * width)
    x = b.conv2d(x, *params(cin, 3, 3, 3), stride=2, act="RELU6", name="stem")
    blocks = [(t, c, s if i == 0 else 1) for t, c, n, s in _BLOCKS for i in range(n)]
    for k, (t, c, stride) in enumerate(blocks[:num_blocks]):
        cout, hidden, y = make_divisible(c * width), cin * t, x
        if t != 1:
            y = b.conv2d(y, *params(hidden, 1, 1, cin, True), act="RELU6", sparse=fmt(hidden), name=f"block{k}/expand")
        w = (rng.standard_normal((1, 3, 3, hidden)) * math.sqrt(2.0 / 9)).astype(np.float32)
        bias = (rng.standard_normal(hidden) * 0.05).astype(np.float32)
        y = b.depthwise_conv2d(y, w, bias, stride, act="RELU6", name=f"block{k}/dw")
        y = b.conv2d(y, *params(cout, 1, 1, hidden, True), sparse=fmt(cout), name=f"block{k}/project")
        if stride == 1 and cin == cout:
            y = b.add(y, x, name=f"block{k}/add")
        x, cin = y, cout
    head = make_divisible(1280 * width) if width > 1.0 else 1280
    x = b.conv2d(x, *params(head, 1, 1, cin, True), act="RELU6", sparse=fmt(head), name="head")
    x = b.reshape(b.mean_hw(x, name="pool"), [1, head], name="flatten")
    w, bias = params(num_classes, 1, 1, head, True)
    x = b.fully_connected(x, w.reshape(num_classes, head), bias, sparse=fmt(num_classes), name="classifier")
    b.output(b.softmax(x, name="probs"))
    return b.finish()


def _uint8_tensor(b: TfliteBuilder, name: str, shape, scale: float, zero: int) -> int:
    """A uint8 activation tensor with one scale and zero point."""
    t = b._tensor(name, shape, "uint8")
    b.tensors[t].quant = {"scale": np.array([scale], np.float32), "zero": np.array([zero]), "axis": 0}
    return t


def _uint8_conv(b: TfliteBuilder, x: int, x_scale: float, w: np.ndarray, name: str, stride: int = 1, dw: bool = False,
                act: str = "RELU6", out: tuple = (6 / 255, 0), padding: str = "SAME") -> int:
    """A conv (OHWI weights) or depthwise conv (1HWC) as TF1's quantization-aware training wrote it: uint8 weights
    asymmetric over the tensor's own min / max, an int32 bias (random, small), output quantized as `out`."""
    rng = b.rng
    n, h, wd, c = b.shape(x)
    lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
    ws = (hi - lo) / 255
    wz = int(round(-lo / ws))
    wq = np.clip(np.round(w / ws) + wz, 0, 255).astype(np.uint8)
    wt = b._tensor(f"{name}/weights_quant", w.shape, "uint8", data=wq.tobytes(),
                   quant={"scale": np.array([ws], np.float32), "zero": np.array([wz]), "axis": 0})
    cout = w.shape[3] if dw else w.shape[0]
    bias = np.round(rng.standard_normal(cout) * 0.05 / (x_scale * ws)).astype(np.int32)
    bt = b._tensor(f"{name}/bias", [cout], "int32", data=bias.tobytes(),
                   quant={"scale": np.array([x_scale * ws], np.float32), "zero": np.zeros(1), "axis": 0})
    y = _uint8_tensor(b, name, [n, _out_size(h, w.shape[1], stride, padding),
                                _out_size(wd, w.shape[2], stride, padding), cout], *out)
    code, opts = (_Op.DEPTHWISE_CONV_2D, _Opt.DepthwiseConv2DOptions) if dw else (_Op.CONV_2D, _Opt.Conv2DOptions)
    extra = {"DepthMultiplier": 1} if dw else {}
    b.ops.append(_Operator(code, [x, wt, bt], [y], opts, dict(
        Padding=_PADS[padding], StrideW=stride, StrideH=stride, FusedActivationFunction=_ACTS[act],
        DilationWFactor=1, DilationHFactor=1, **extra)))
    return y


def uint8_ssd_tflite(regular_nms: bool = False) -> bytes:
    """A tiny SSD detector as TF1's quantized detection models end (ssd_mobilenet_v1_quantized): uint8 conv, box and
    class heads over 8 x 8 anchors, uint8 reshapes and LOGISTIC, uint8-quantized anchors, and
    TFLite_Detection_PostProcess reading them all quantized (it dequantizes them itself)."""
    b = TfliteBuilder(seed=0)
    rng = b.rng
    x = _uint8_tensor(b, "input", [1, 16, 16, 3], 1 / 128, 128)
    b.inputs.append(x)
    c1 = _uint8_conv(b, x, 1 / 128, (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "c1", stride=2)
    heads = []
    for name, spread, out in (("box", 0.3, (0.05, 128)), ("cls", 0.5, (0.1, 128))):
        head = _uint8_conv(b, c1, 6 / 255, (rng.standard_normal((4, 1, 1, 8)) * spread).astype(np.float32), name,
                           act="NONE", out=out)
        flat = _uint8_tensor(b, f"{name}/reshape", [1, 64, 4], *out)
        b.ops.append(_Operator(_Op.RESHAPE, [head, b.const(np.array([1, 64, 4]), f"{name}/shape", "int32")], [flat]))
        heads.append(flat)
    scores = _uint8_tensor(b, "scores", [1, 64, 4], 1 / 256, 0)
    b.ops.append(_Operator(_Op.LOGISTIC, [heads[1]], [scores]))
    yy, xx = np.meshgrid((np.arange(8) + 0.5) / 8, (np.arange(8) + 0.5) / 8, indexing="ij")
    anchors = np.stack([yy.ravel(), xx.ravel(), np.full(64, 0.2), np.full(64, 0.2)], 1)
    anchors_q = b._tensor("anchors", [64, 4], "uint8", data=np.round(anchors * 255).astype(np.uint8).tobytes(),
                          quant={"scale": np.array([1 / 255], np.float32), "zero": np.array([0]), "axis": 0})
    for out in b.detection_postprocess(heads[0], scores, anchors_q, use_regular_nms=regular_nms, num_classes=3):
        b.output(out)
    return b.finish()


def uint8_mobilenet_v1_tflite(width: float = 1.0, resolution: int = 224, num_classes: int = 1000, seed: int = 0,
                              num_layers: int | None = None, softmax: bool = True) -> bytes:
    """MobileNetV1 quantized as TF1's quantization-aware training wrote it (mobilenet_v1_1.0_224_quant.tflite):
    uint8 input, activations and weights, each tensor with one scale and a zero point (weights asymmetric: their
    own min / max over the tensor), int32 biases, ReLU6 fused (activations on [0, 6]), global average pool, a 1x1
    conv classifier, reshape and a uint8 softmax (softmax False: the logits are the output). Random weights;
    num_layers keeps the first depthwise-separable layers (for small tests)."""
    b = TfliteBuilder(seed=seed)
    rng = b.rng
    relu6 = (6 / 255, 0)

    def he(o, kh, kw, i, fan):
        return (rng.standard_normal((o, kh, kw, i)) * math.sqrt(2.0 / fan)).astype(np.float32)

    x = _uint8_tensor(b, "input", [1, resolution, resolution, 3], 1 / 128, 128)
    b.inputs.append(x)
    cin = int(32 * width)
    x = _uint8_conv(b, x, 1 / 128, he(cin, 3, 3, 3, 27), "Conv2d_0", stride=2)
    layers = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    for k, (c, stride) in enumerate(layers[:num_layers], 1):
        x = _uint8_conv(b, x, relu6[0], he(1, 3, 3, cin, 9), f"Conv2d_{k}_depthwise", stride=stride, dw=True)
        cout = int(c * width)
        x = _uint8_conv(b, x, relu6[0], he(cout, 1, 1, cin, cin), f"Conv2d_{k}_pointwise")
        cin = cout
    n, h, w, _ = b.shape(x)
    pool = _uint8_tensor(b, "AvgPool_1a", [1, 1, 1, cin], *relu6)
    b.ops.append(_Operator(_Op.AVERAGE_POOL_2D, [x], [pool], _Opt.Pool2DOptions, dict(
        Padding=_PADS["VALID"], StrideW=w, StrideH=h, FilterWidth=w, FilterHeight=h, FusedActivationFunction=0)))
    # NOTE: weights 8x He's: logits several units apart, as a trained classifier's, so the softmax is not flat
    logits = _uint8_conv(b, pool, relu6[0], 8 * he(num_classes, 1, 1, cin, cin), "Conv2d_1c_1x1", act="NONE",
                         out=(0.1, 128))
    flat = _uint8_tensor(b, "Reshape", [1, num_classes], 0.1, 128)
    b.ops.append(_Operator(_Op.RESHAPE, [logits, b.const(np.array([1, num_classes]), "shape", "int32")], [flat]))
    if softmax:
        probs = _uint8_tensor(b, "Predictions", [1, num_classes], 1 / 256, 0)
        b.ops.append(_Operator(_Op.SOFTMAX, [flat], [probs], _Opt.SoftmaxOptions, {"Beta": 1.0}))
        flat = probs
    b.output(flat)
    return b.finish()


# the options of mediapipe_geometry_tflite's Landmarks2TransformMatrix, versions 2 and 1
GEOMETRY_V2_MATRIX = dict(left_rotation_idx=1, right_rotation_idx=4, target_rotation_radians=0.3,
                          subset_idxs=[0, 2, 3, 5, 6], output_width=12, output_height=10, scale_x=1.5, scale_y=1.25)
GEOMETRY_V1_MATRIX = dict(input_hw=[16, 18], output_hw=[12, 10], dimensions=3, landmarks_range=20,
                          bbox_size_multiplier=1.5, left_rotation_idx=1, right_rotation_idx=4, subset=[0, 2, 3, 5, 6])


def mediapipe_geometry_tflite(version: int = 2) -> bytes:
    """MediaPipe's attention face mesh pattern, its geometry custom ops of op code `version` (1 or 2): a transform
    matrix from landmarks [1, 8, 3] (v1: [1, 1, 1, 24]), a feature map [1, 16, 18, 5] warped by it to a 10 x 12 crop,
    and landmarks found in the crop [1, 6, 3] (v1: [1, 1, 6, 3], scale 0.5) mapped back by it; all three outputs."""
    b = TfliteBuilder(seed=4)
    lm = b.input([1, 8, 3] if version == 2 else [1, 1, 1, 24], "landmarks")
    feat = b.input([1, 16, 18, 5], "features")
    crop_lm = b.input([1, 6, 3] if version == 2 else [1, 1, 6, 3], "crop_landmarks")
    matrix = b.mediapipe_geometry("Landmarks2TransformMatrix", [lm], [1, 4, 4], version,
                                  GEOMETRY_V2_MATRIX if version == 2 else GEOMETRY_V1_MATRIX, "matrix")
    b.output(matrix)
    b.output(b.mediapipe_geometry("TransformTensorBilinear", [feat, matrix], [1, 10, 12, 5], version,
                                  {"mode": "bilinear", "output_size": [10, 12]} if version == 1 else {}, "crop"))
    b.output(b.mediapipe_geometry("TransformLandmarks", [crop_lm, matrix], b.shape(crop_lm), version,
                                  {"dimensions": 3, "scale": 0.5} if version == 1 else {}, "mapped"))
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
