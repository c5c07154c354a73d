"""A small ONNX graph builder for the built-in CNNs, emitting what real exporters emit."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from targets.errors import ShrinkcError


class OnnxBuilder:
    """Appends nodes and initializers; each layer gets a readable, unique name."""

    def __init__(self, name: str, seed: int = 0, explicit_pad: bool = False):
        self.name = name
        self.explicit_pad = explicit_pad  # separate Pad node before each kxk conv, as TF->ONNX emits
        self.opset = 13  # raised by ops that need a newer one
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self._count: dict[str, int] = {}

    def unique(self, base: str) -> str:
        n = self._count.get(base, 0)
        self._count[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.unique(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def input(self, name: str, shape: list, dtype=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def node(self, op: str, inputs: list[str], name: str | None = None, n_out: int = 1, **attrs) -> str:
        name = self.unique(name or op)
        outs = [name] if n_out == 1 else [f"{name}:{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0]

    # --- layers -----------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             name: str = "conv", bias: bool = True, bn: bool = False, sparsity: float = 0.0,
             pad: int | None = None, block: int = 1) -> str:
        fan_in = cin // groups * k * k
        w = self.rng.standard_normal((cout, cin // groups, k, k)).astype(np.float32)
        w *= np.float32(np.sqrt(2.0 / fan_in))
        if sparsity > 0:
            w[:, :, 0, 0] = zero_out(w[:, :, 0, 0], sparsity, block, self.rng) if k == 1 and groups == 1 \
                else zero_out(w.reshape(1, -1), sparsity, 1, self.rng).reshape(w.shape)
        p = k // 2 if pad is None else pad
        if self.explicit_pad and p > 0:
            x, p = self.pad(x, p, name=name + ".pad"), 0
        inputs = [x, self.const(name + ".weight", w)]
        if bias and not bn:
            inputs.append(self.const(name + ".bias", (self.rng.standard_normal(cout) * 0.05).astype(np.float32)))
        y = self.node("Conv", inputs, name=name, kernel_shape=[k, k], strides=[stride, stride],
                      pads=[p, p, p, p], group=groups, dilations=[1, 1])
        if bn:
            y = self.batchnorm(y, cout, name=name + ".bn")
        return y

    def pad(self, x: str, p: int, name: str = "pad") -> str:
        """Zero-pad H and W by p on each side with a Pad node (opset 13: pads as an int64 input)."""
        pads = self.const(name + ".pads", np.array([0, 0, p, p, 0, 0, p, p], np.int64))
        return self.node("Pad", [x, pads], name=name, mode="constant")

    def batchnorm(self, x: str, c: int, name: str = "bn") -> str:
        r = self.rng
        scale = (1.0 + 0.1 * r.standard_normal(c)).astype(np.float32)
        shift = (0.05 * r.standard_normal(c)).astype(np.float32)
        mean = (0.05 * r.standard_normal(c)).astype(np.float32)
        var = (1.0 + 0.1 * r.random(c)).astype(np.float32)
        ins = [x] + [self.const(f"{name}.{k}", v) for k, v in
                     (("scale", scale), ("shift", shift), ("mean", mean), ("var", var))]
        return self.node("BatchNormalization", ins, name=name, epsilon=1e-5)

    def relu6(self, x: str, name: str = "relu6") -> str:
        lo = self.node("Constant", [], name=name + ".min", value=numpy_helper.from_array(np.array(0.0, np.float32)))
        hi = self.node("Constant", [], name=name + ".max", value=numpy_helper.from_array(np.array(6.0, np.float32)))
        return self.node("Clip", [x, lo, hi], name=name)

    def relu(self, x: str, name: str = "relu") -> str:
        return self.node("Relu", [x], name=name)

    def hardswish(self, x: str, name: str = "hswish") -> str:
        self.opset = max(self.opset, 14)  # HardSwish exists from opset 14 on
        return self.node("HardSwish", [x], name=name)

    def hardsigmoid(self, x: str, name: str = "hsigmoid") -> str:
        return self.node("HardSigmoid", [x], name=name, alpha=1.0 / 6, beta=0.5)

    def silu(self, x: str, name: str = "silu") -> str:
        """x * sigmoid(x) (SiLU / swish), as torch.onnx and the TFLite converter write it: Sigmoid and Mul."""
        return self.mul(x, self.node("Sigmoid", [x], name=name + ".sigmoid"), name=name)

    def squeeze_excite(self, x: str, c: int, squeeze: int, name: str = "se", efficientnet: bool = False) -> str:
        """x * hardsigmoid(conv(relu(conv(global_pool(x))))), MobileNetV3's squeeze-and-excitation; efficientnet:
        x * sigmoid(conv(silu(conv(global_pool(x))))), EfficientNet's."""
        s = self.global_pool(x, name=name + ".pool")
        s = self.conv(s, c, squeeze, 1, name=name + ".fc1")
        s = self.silu(s, name=name + ".silu") if efficientnet else self.relu(s, name=name + ".relu")
        s = self.conv(s, squeeze, c, 1, name=name + ".fc2")
        s = self.node("Sigmoid", [s], name=name + ".sigmoid") if efficientnet else \
            self.hardsigmoid(s, name=name + ".hsigmoid")
        return self.mul(x, s, name=name + ".mul")

    def add(self, a: str, b: str, name: str = "add") -> str:
        return self.node("Add", [a, b], name=name)

    def mul(self, a: str, b: str, name: str = "mul") -> str:
        return self.node("Mul", [a, b], name=name)

    def global_pool(self, x: str, name: str = "gap") -> str:
        return self.node("GlobalAveragePool", [x], name=name)

    def flatten_via_shape(self, x: str, name: str = "flatten") -> str:
        """Reshape to (N, -1) through a Shape->Gather->Concat subgraph, as torch.onnx emits it."""
        shp = self.node("Shape", [x], name=name + ".shape")
        idx = self.const(name + ".idx", np.array(0, np.int64))
        n = self.node("Gather", [shp, idx], name=name + ".gather", axis=0)
        n1 = self.node("Unsqueeze", [n, self.const(name + ".axes", np.array([0], np.int64))], name=name + ".unsq")
        tail = self.const(name + ".tail", np.array([-1], np.int64))
        new_shape = self.node("Concat", [n1, tail], name=name + ".concat", axis=0)
        return self.node("Reshape", [x, new_shape], name=name)

    def linear(self, x: str, cin: int, cout: int, name: str = "fc", sparsity: float = 0.0) -> str:
        w = (self.rng.standard_normal((cout, cin)) * np.sqrt(1.0 / cin)).astype(np.float32)
        if sparsity > 0:   # NOTE: only then is the generator drawn from, so dense models keep their weights
            w = zero_out(w, sparsity, 1, self.rng)
        b = (self.rng.standard_normal(cout) * 0.05).astype(np.float32)
        return self.node("Gemm", [x, self.const(name + ".weight", w), self.const(name + ".bias", b)],
                         name=name, transB=1)

    def finish(self, outputs: list[str], opset: int | None = None) -> onnx.ModelProto:
        opset = opset or self.opset
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="shrinkc.zoo")
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        # exporters declare output shapes; fill them from inference
        inferred = {v.name: v for v in model.graph.value_info}
        for o in model.graph.output:
            if o.name in inferred:
                o.type.CopyFrom(inferred[o.name].type)
        onnx.checker.check_model(model)
        return model


def zero_out(w: np.ndarray, sparsity: float, block: int, rng: np.random.Generator) -> np.ndarray:
    """[Cout, Cin] weights with exactly round(sparsity * blocks) blocks of `block` output channels x 1 input
    channel set to zero, at random places (block 1: unstructured). Cout must be a multiple of `block`."""
    cout, cin = w.shape
    if cout % block:
        raise ShrinkcError(f"{cout} output channels are not a multiple of sparse block {block}",
                           "use block 1, 2 or 4 (every MobileNet 1x1 conv has a multiple of 8 channels)")
    blocks = w.reshape(cout // block, block, cin).transpose(0, 2, 1).reshape(-1, block).copy()   # [nb*cin, block]
    blocks[rng.choice(len(blocks), int(round(sparsity * len(blocks))), replace=False)] = 0.0
    return np.ascontiguousarray(blocks.reshape(cout // block, cin, block).transpose(0, 2, 1).reshape(cout, cin))


def check_shrink_options(model: str, sparsity: float, linear_blocks, n_expansion: int) -> None:
    """Raise ShrinkcError when sparsity or linear_blocks do not fit a model with n_expansion blocks."""
    if not 0.0 <= sparsity < 1.0:
        raise ShrinkcError(f"{model}: sparsity {sparsity} is outside [0, 1)", "give the share of zeros, e.g. 0.85")
    bad = [i for i in linear_blocks if not 0 <= i < n_expansion]
    if bad:
        raise ShrinkcError(f"{model}: linear_blocks {bad} do not exist",
                           f"use expansion block indices from 0 to {n_expansion - 1}")
