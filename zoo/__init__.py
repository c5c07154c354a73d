"""Built-in CNNs generated in code with random weights: a registry by name and the `make demo` model."""
from __future__ import annotations

import inspect
from functools import partial
from typing import Callable

import onnx

from targets.errors import ShrinkcError
from zoo.blazeface import blazeface
from zoo.efficientnet_lite import efficientnet_b0, efficientnet_lite
from zoo.mobilenet_v1 import mobilenet_v1
from zoo.mobilenet_v2 import mobilenet_v2
from zoo.mobilenet_v3 import mobilenet_v3

BUILTIN: dict[str, Callable[..., onnx.ModelProto]] = {
    "mobilenet_v1": mobilenet_v1,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v2_1.4": partial(mobilenet_v2, width=1.4),
    "mobilenet_v3_large": partial(mobilenet_v3, variant="large"),
    "mobilenet_v3_small": partial(mobilenet_v3, variant="small"),
    "efficientnet_lite0": partial(efficientnet_lite, variant=0),
    "efficientnet_b0": efficientnet_b0,     # SiLU and squeeze-and-excite
    "blazeface": blazeface,           # a detector: two outputs (scores, boxes), no classifier
}

# the demo's linear blocks, as expansion block indices: blocks 5 (32 ch), 9 (64 ch) and 12 (96 ch)
DEMO_LINEAR_BLOCKS = (4, 8, 11)
DEMO_SPARSE_FROM = 10  # first block with 96 output channels
DEMO_SPARSITY = 0.85


def options(name: str) -> list[str]:
    """The keyword options that build(name, ...) accepts."""
    return [p for p in inspect.signature(BUILTIN[name]).parameters if p != "variant"]


def build(name: str, **opts) -> onnx.ModelProto:
    """Build the built-in model `name` with keyword options (width, resolution, sparsity, ...)."""
    if name not in BUILTIN:
        raise ShrinkcError(f"unknown built-in model '{name}'", f"use one of: {', '.join(BUILTIN)}")
    bad = sorted(set(opts) - set(options(name)))
    if bad:
        raise ShrinkcError(f"built-in model '{name}' has no option {', '.join(bad)}",
                           f"use some of: {', '.join(options(name))}")
    return BUILTIN[name](**opts)


def demo_model() -> onnx.ModelProto:
    """The example model of `make demo`: MobileNetV2 with work left for DepthShrinker-style passes.

    Exactly what it contains:
    - MobileNetV2 (Sandler et al. 2018) at width 1.0, input "input" 1x3x224x224 float32 NCHW,
      1000 classes, random weights from seed 0, opset 13;
    - batch norm folded into conv biases (no BatchNormalization), ReLU6 as Clip with Constant
      bounds 0 and 6, convs with their own pads (no Pad nodes), flatten through a
      Shape->Gather->Unsqueeze->Concat->Reshape subgraph, Gemm classifier;
    - 85% unstructured zeros (exactly round(0.85 * size) per tensor) in the 1x1 expand and project
      weights of blocks 10-16 (the stages with 96, 160 and 320 output channels) and in the
      320->1280 head conv; the stem, all depthwise convs, blocks 0-9 and the classifier are dense;
    - 3 linear inverted residual blocks, with no ReLU6 after expand nor after depthwise:
      blocks 5 (32 ch), 9 (64 ch) and 12 (96 ch, also sparse), all stride 1 with a residual Add
      (expansion block indices 4, 8, 11 in `linear_blocks` terms).
    """
    return mobilenet_v2(width=1.0, resolution=224, num_classes=1000, sparsity=DEMO_SPARSITY,
                        sparse_from=DEMO_SPARSE_FROM, linear_blocks=DEMO_LINEAR_BLOCKS, seed=0)
