"""MobileNetV2 (Sandler et al. 2018) as an ONNX graph generated in code, with random weights."""
from __future__ import annotations

import onnx

from zoo.onnx_builder import OnnxBuilder, check_shrink_options

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2
_BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def mobilenet_v2(width: float = 1.0, resolution: int = 224, num_classes: int = 1000,
                 sparsity: float = 0.0, linear_blocks: tuple[int, ...] = (), bn: bool = False,
                 seed: int = 0, explicit_pad: bool = False, sparse_from: int = 0,
                 sparse_block: int = 1, sparse_fc: bool = False) -> onnx.ModelProto:
    """Build MobileNetV2.

    sparsity: share of zeros in every 1x1 conv weight (unstructured), 0 for dense.
    sparse_from: index of the first block (counting all 17 blocks from 0) whose 1x1 convs get
        `sparsity`; the blocks before it stay dense, the head conv always gets it.
    sparse_block: zeros come in blocks of this many output channels x 1 input channel (1: unstructured,
        4: the 4x1 blocks XNNPACK's and our block kernels use).
    sparse_fc: the classifier's weights get `sparsity` too (unstructured); off by default, so a model
        built without it keeps its dense classifier and its exact weights.
    linear_blocks: indices of inverted residual blocks whose two ReLU6 are removed
        (DepthShrinker's 'linear' blocks), counting the expansion blocks from 0.
    bn: emit BatchNormalization nodes after convs instead of folded biases.
    explicit_pad: a separate Pad node before each 3x3 conv, whose own pads are 0.
    """
    check_shrink_options("mobilenet_v2", sparsity, linear_blocks, sum(n for t, _, n, _ in _BLOCKS if t != 1))
    b = OnnxBuilder(f"mobilenet_v2_{width}_{resolution}", seed, explicit_pad)
    x = b.input("input", [1, 3, resolution, resolution])
    cin = make_divisible(32 * width)
    x = b.relu6(b.conv(x, 3, cin, 3, 2, name="stem", bn=bn), name="stem.relu6")
    block = 0
    expand_idx = 0
    for t, c, n, s in _BLOCKS:
        cout = make_divisible(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            name = f"block{block}"
            hidden = cin * t
            linear = t != 1 and expand_idx in linear_blocks
            sp = sparsity if block >= sparse_from else 0.0
            y = x
            if t != 1:
                y = b.conv(y, cin, hidden, 1, name=f"{name}.expand", bn=bn, sparsity=sp, block=sparse_block)
                if not linear:
                    y = b.relu6(y, name=f"{name}.expand.relu6")
            y = b.conv(y, hidden, hidden, 3, stride, groups=hidden, name=f"{name}.dw", bn=bn)
            if not linear:
                y = b.relu6(y, name=f"{name}.dw.relu6")
            y = b.conv(y, hidden, cout, 1, name=f"{name}.project", bn=bn, sparsity=sp, block=sparse_block)
            if stride == 1 and cin == cout:
                y = b.add(y, x, name=f"{name}.add")
            if t != 1:
                expand_idx += 1
            x, cin = y, cout
            block += 1
    last = make_divisible(1280 * max(1.0, width))
    x = b.conv(x, cin, last, 1, name="head", bn=bn, sparsity=sparsity, block=sparse_block)
    x = b.relu6(x, name="head.relu6")
    x = b.flatten_via_shape(b.global_pool(x))
    x = b.linear(x, last, num_classes, name="classifier", sparsity=sparsity if sparse_fc else 0.0)
    return b.finish([x])
