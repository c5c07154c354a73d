"""EfficientNet-Lite0..4 (Google's TF-Lite variant of EfficientNet) and EfficientNet-B0 as ONNX graphs with random
weights."""
from __future__ import annotations

import math

import onnx

from targets.errors import ShrinkcError
from zoo.mobilenet_v2 import make_divisible
from zoo.onnx_builder import OnnxBuilder, check_shrink_options

# (expansion, kernel, first stride, output channels, repeats): EfficientNet-B0's stages
_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
           (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
# variant -> (width multiplier, depth multiplier, default resolution)
_VARIANTS = {0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260),
             3: (1.2, 1.4, 280), 4: (1.4, 1.8, 300)}
_STEM, _HEAD = 32, 1280  # fixed in Lite, not scaled by the width multiplier


def _repeats(stage: int, n: int, depth: float) -> int:
    """Lite keeps the first and last stage's repeats and scales the others up (ceil)."""
    return n if stage in (0, len(_STAGES) - 1) else int(math.ceil(n * depth))


def efficientnet_lite(variant: int = 0, resolution: int | None = None, num_classes: int = 1000,
                      sparsity: float = 0.0, linear_blocks: tuple[int, ...] = (), bn: bool = False,
                      seed: int = 0, explicit_pad: bool = False) -> onnx.ModelProto:
    """Build EfficientNet-Lite<variant>.

    Stem 3x3/2 conv to 32 + ReLU6; MBConv blocks of EfficientNet-B0 without squeeze-excite
    (1x1 expand + ReLU6 when expansion is 6, kxk depthwise + ReLU6, 1x1 project, residual add
    when stride 1 and cin == cout), channels scaled by the variant's width and made divisible
    by 8, repeats of the inner stages scaled by its depth; head 1x1 conv to 1280 + ReLU6,
    global pool, flatten, Gemm classifier. Symmetric pads (TF uses SAME, asymmetric at stride 2).
    resolution: input size, None for the variant's own (224, 240, 260, 280, 300).
    sparsity: share of zeros in every 1x1 conv weight (expand, project, head).
    linear_blocks: indices of the blocks with an expand conv, from 0, whose two ReLU6 are removed.
    bn: BatchNormalization after convs instead of folded biases.
    explicit_pad: a separate Pad node before each kxk conv, whose own pads are 0.
    """
    if variant not in _VARIANTS:
        raise ShrinkcError(f"unknown EfficientNet-Lite variant {variant!r}", "use 0, 1, 2, 3 or 4")
    width, depth, default_res = _VARIANTS[variant]
    resolution = resolution or default_res
    n_expansion = sum(_repeats(i, n, depth) for i, (t, _, _, _, n) in enumerate(_STAGES) if t != 1)
    check_shrink_options(f"efficientnet_lite{variant}", sparsity, linear_blocks, n_expansion)

    b = OnnxBuilder(f"efficientnet_lite{variant}_{resolution}", seed, explicit_pad)
    return _network(b, width, depth, resolution, num_classes, sparsity, linear_blocks, bn, b.relu6, se=False)


def efficientnet_b0(resolution: int = 224, num_classes: int = 1000, sparsity: float = 0.0,
                    seed: int = 0) -> onnx.ModelProto:
    """Build EfficientNet-B0 (Tan & Le 2019) as torchvision has it: the network of efficientnet_lite(0) with
    SiLU (x * sigmoid(x), written as exporters write it: Sigmoid and Mul) in place of every ReLU6, and
    squeeze-and-excite after every depthwise conv (global pool, 1x1 to a quarter of the block's input
    channels, SiLU, 1x1 back, sigmoid gate). sparsity: share of zeros in every expand, project and head
    weight (the squeeze-and-excite convs stay dense)."""
    n_expansion = sum(n for t, _, _, _, n in _STAGES if t != 1)
    check_shrink_options("efficientnet_b0", sparsity, (), n_expansion)
    b = OnnxBuilder(f"efficientnet_b0_{resolution}", seed)
    return _network(b, 1.0, 1.0, resolution, num_classes, sparsity, (), False, b.silu, se=True)


def _network(b: OnnxBuilder, width: float, depth: float, resolution: int, num_classes: int, sparsity: float,
             linear_blocks, bn: bool, act, se: bool) -> onnx.ModelProto:
    """The MBConv network of EfficientNet-B0's stages, with activation `act` (an OnnxBuilder method) and
    squeeze-and-excite where `se`."""
    x = b.input("input", [1, 3, resolution, resolution])
    tag = act.__name__       # node names: "stem.relu6", "block3.dw.silu", ...
    x = act(b.conv(x, 3, _STEM, 3, 2, name="stem", bn=bn), name=f"stem.{tag}")
    cin, block, expand_idx = _STEM, 0, 0
    for stage, (t, k, s, c, n) in enumerate(_STAGES):
        cout = make_divisible(c * width)
        for i in range(_repeats(stage, n, depth)):
            name, stride, hidden = f"block{block}", s if i == 0 else 1, cin * t
            linear = t != 1 and expand_idx in linear_blocks
            y = x
            if t != 1:
                expand_idx += 1
                y = b.conv(y, cin, hidden, 1, name=f"{name}.expand", bn=bn, sparsity=sparsity)
                if not linear:
                    y = act(y, name=f"{name}.expand.{tag}")
            y = b.conv(y, hidden, hidden, k, stride, groups=hidden, name=f"{name}.dw", bn=bn)
            if not linear:
                y = act(y, name=f"{name}.dw.{tag}")
            if se:
                y = b.squeeze_excite(y, hidden, max(1, cin // 4), name=f"{name}.se", efficientnet=True)
            y = b.conv(y, hidden, cout, 1, name=f"{name}.project", bn=bn, sparsity=sparsity)
            if stride == 1 and cin == cout:
                y = b.add(y, x, name=f"{name}.add")
            x, cin, block = y, cout, block + 1
    x = act(b.conv(x, cin, _HEAD, 1, name="head", bn=bn, sparsity=sparsity), name=f"head.{tag}")
    x = b.flatten_via_shape(b.global_pool(x))
    x = b.linear(x, _HEAD, num_classes, name="classifier")
    return b.finish([x])
