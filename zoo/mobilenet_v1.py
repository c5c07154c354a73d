"""MobileNetV1 (Howard et al. 2017) as an ONNX graph generated in code, with random weights.

No inverted residuals: a 3x3 stride-2 stem, then 13 depthwise-separable layers (3x3 depthwise + ReLU6,
1x1 pointwise + ReLU6), global pool, classifier. The sparse-inference papers (Elsen et al., "Fast Sparse
ConvNets", 2020) prune its 1x1 convs, which hold almost all of its weights and FLOPs.
"""
from __future__ import annotations

import onnx

from zoo.mobilenet_v2 import make_divisible
from zoo.onnx_builder import OnnxBuilder, check_shrink_options

# (depthwise stride, pointwise output channels) per layer, the paper's Table 1
_LAYERS = [(1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512)] + [(1, 512)] * 5 + [(2, 1024), (1, 1024)]


def mobilenet_v1(width: float = 1.0, resolution: int = 224, num_classes: int = 1000, sparsity: float = 0.0,
                 bn: bool = False, seed: int = 0, explicit_pad: bool = False, sparse_block: int = 1,
                 sparse_fc: bool = False) -> onnx.ModelProto:
    """Build MobileNetV1. sparsity: share of zeros in every pointwise (1x1) conv weight, in blocks of
    `sparse_block` output channels x 1 input channel (1: unstructured); sparse_fc: the classifier's too.
    bn: BatchNormalization nodes after the convs instead of folded biases; explicit_pad: a Pad node before
    each 3x3 conv."""
    check_shrink_options("mobilenet_v1", sparsity, (), 0)
    b = OnnxBuilder(f"mobilenet_v1_{width}_{resolution}", seed, explicit_pad)
    x = b.input("input", [1, 3, resolution, resolution])
    c = make_divisible(32 * width)
    x = b.relu6(b.conv(x, 3, c, 3, 2, name="stem", bn=bn), name="stem.relu6")
    for i, (stride, out) in enumerate(_LAYERS):
        cout = make_divisible(out * width)
        x = b.relu6(b.conv(x, c, c, 3, stride, groups=c, name=f"layer{i}.dw", bn=bn), name=f"layer{i}.dw.relu6")
        x = b.conv(x, c, cout, 1, name=f"layer{i}.pw", bn=bn, sparsity=sparsity, block=sparse_block)
        x, c = b.relu6(x, name=f"layer{i}.pw.relu6"), cout
    x = b.flatten_via_shape(b.global_pool(x))
    x = b.linear(x, c, num_classes, name="classifier", sparsity=sparsity if sparse_fc else 0.0)
    return b.finish([x])
