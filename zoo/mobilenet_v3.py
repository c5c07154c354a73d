"""MobileNetV3-Large/Small (Howard et al. 2019) as an ONNX graph generated in code, with random weights."""
from __future__ import annotations

import onnx

from targets.errors import ShrinkcError
from zoo.mobilenet_v2 import make_divisible
from zoo.onnx_builder import OnnxBuilder, check_shrink_options

# (kernel, expansion size, output channels, squeeze-excite, ReLU or hard-swish, stride): Tables 1 and 2
_LARGE = [
    (3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1),
]
_SMALL = [
    (3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1),
]
# variant -> (blocks, width of the hidden linear layer before the classifier)
_VARIANTS = {"large": (_LARGE, 1280), "small": (_SMALL, 1024)}


def mobilenet_v3(variant: str = "large", width: float = 1.0, resolution: int = 224,
                 num_classes: int = 1000, sparsity: float = 0.0, linear_blocks: tuple[int, ...] = (),
                 bn: bool = False, seed: int = 0, explicit_pad: bool = False) -> onnx.ModelProto:
    """Build MobileNetV3 with torchvision's layout.

    Stem 3x3/2 conv + hard-swish; bottleneck blocks (1x1 expand when the expansion size differs
    from the input, kxk depthwise, optional squeeze-excite, 1x1 project, residual add when
    stride 1 and cin == cout); head 1x1 conv to 6x the last block's channels + hard-swish,
    global pool, flatten, Gemm + hard-swish, Gemm classifier. As in torchvision, every channel
    count (also the hidden 1280/1024) is scaled by `width` and made divisible by 8, and the
    Small head conv has no squeeze-excite (the paper's Table 2 lists one).
    sparsity: share of zeros in every 1x1 conv weight outside squeeze-excite (expand, project, head).
    linear_blocks: indices of the blocks with an expand conv, from 0, whose two activations
        (after expand and after depthwise) are removed; their squeeze-excite stays.
    bn: BatchNormalization after convs (not in squeeze-excite) instead of folded biases.
    explicit_pad: a separate Pad node before each kxk conv, whose own pads are 0.
    """
    if variant not in _VARIANTS:
        raise ShrinkcError(f"unknown MobileNetV3 variant '{variant}'", "use 'large' or 'small'")
    table, hidden = _VARIANTS[variant]
    ch = lambda c: make_divisible(c * width)  # noqa: E731
    cin = ch(16)
    block_inputs = [cin] + [ch(row[2]) for row in table[:-1]]
    n_expansion = sum(ch(row[1]) != c for row, c in zip(table, block_inputs))
    check_shrink_options(f"mobilenet_v3_{variant}", sparsity, linear_blocks, n_expansion)

    b = OnnxBuilder(f"mobilenet_v3_{variant}_{width}_{resolution}", seed, explicit_pad)
    x = b.input("input", [1, 3, resolution, resolution])
    x = b.hardswish(b.conv(x, 3, cin, 3, 2, name="stem", bn=bn), name="stem.hswish")
    expand_idx = 0
    for i, (k, exp, c, se, nl, stride) in enumerate(table):
        name, exp, cout = f"block{i}", ch(exp), ch(c)
        act = b.relu if nl == "RE" else b.hardswish
        suffix = ".relu" if nl == "RE" else ".hswish"
        y, linear = x, False
        if exp != cin:
            linear = expand_idx in linear_blocks
            expand_idx += 1
            y = b.conv(y, cin, exp, 1, name=f"{name}.expand", bn=bn, sparsity=sparsity)
            if not linear:
                y = act(y, name=f"{name}.expand{suffix}")
        y = b.conv(y, exp, exp, k, stride, groups=exp, name=f"{name}.dw", bn=bn)
        if not linear:
            y = act(y, name=f"{name}.dw{suffix}")
        if se:
            y = b.squeeze_excite(y, exp, make_divisible(exp // 4), name=f"{name}.se")
        y = b.conv(y, exp, cout, 1, name=f"{name}.project", bn=bn, sparsity=sparsity)
        if stride == 1 and cin == cout:
            y = b.add(y, x, name=f"{name}.add")
        x, cin = y, cout
    last_conv, hidden = 6 * cin, ch(hidden)
    x = b.conv(x, cin, last_conv, 1, name="head", bn=bn, sparsity=sparsity)
    x = b.flatten_via_shape(b.global_pool(b.hardswish(x, name="head.hswish")))
    x = b.hardswish(b.linear(x, last_conv, hidden, name="fc"), name="fc.hswish")
    x = b.linear(x, hidden, num_classes, name="classifier")
    return b.finish([x])
