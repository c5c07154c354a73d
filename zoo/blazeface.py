"""A BlazeFace-style face detector (Bazarevsky et al. 2019; MediaPipe's short-range front model) as an
ONNX graph generated in code, with random weights, written the way a TensorFlow export writes it.

128x128 input; a 5x5 stride-2 stem; BlazeBlocks (3x3 depthwise, 1x1 pointwise, residual add, ReLU), where
a stride-2 block's shortcut is a 2x2 max pool and a wider block's shortcut gets zero channels appended
(Pad on the channel axis); "SAME" padding of stride-2 convs as explicit asymmetric Pad nodes; two heads
(16x16 and 8x8) whose 1x1 convs are transposed to NHWC, reshaped to anchors and concatenated into two
outputs: scores [1, 896, 1] and boxes [1, 896, 16]. Layer widths and anchors follow the published model.
"""
from __future__ import annotations

import numpy as np
import onnx

from zoo.onnx_builder import OnnxBuilder

# (output channels, stride) of the single BlazeBlocks at 64x64 .. 16x16, then of the 8x8 ones
_BLOCKS_16 = [(24, 1), (28, 1), (32, 2), (36, 1), (42, 1), (48, 2), (56, 1), (64, 1), (72, 1), (80, 1), (88, 1)]
_BLOCKS_8 = [(96, 2), (96, 1), (96, 1), (96, 1), (96, 1)]
_ANCHORS = (2, 6)            # anchors per pixel of the 16x16 and the 8x8 head


def _asym_pad(b: OnnxBuilder, x: str, before: int, after: int, name: str) -> str:
    """TF's SAME padding of a stride-2 conv on an even plane: `before` rows/columns top-left, `after` bottom-right."""
    pads = b.const(name + ".pads", np.array([0, 0, before, before, 0, 0, after, after], np.int64))
    return b.node("Pad", [x, pads], name=name, mode="constant")


def _block(b: OnnxBuilder, x: str, cin: int, cout: int, stride: int, name: str, sparsity: float, block: int) -> str:
    h = _asym_pad(b, x, 0, 1, name + ".dw.pad") if stride == 2 else x
    h = b.conv(h, cin, cin, 3, stride, groups=cin, name=name + ".dw", pad=0 if stride == 2 else 1)
    h = b.conv(h, cin, cout, 1, name=name + ".pw", sparsity=sparsity, block=block)
    short = b.node("MaxPool", [x], name=name + ".pool", kernel_shape=[2, 2], strides=[2, 2]) if stride == 2 else x
    if cout > cin:
        pads = b.const(name + ".chpad.pads", np.array([0, 0, 0, 0, 0, cout - cin, 0, 0], np.int64))
        short = b.node("Pad", [short, pads], name=name + ".chpad", mode="constant")
    return b.relu(b.add(h, short, name=name + ".add"), name=name + ".relu")


def _head(b: OnnxBuilder, x: str, cin: int, per_anchor: int, anchors: int, name: str) -> str:
    y = b.conv(x, cin, anchors * per_anchor, 1, name=name)
    y = b.node("Transpose", [y], name=name + ".nhwc", perm=[0, 2, 3, 1])
    shape = b.const(name + ".shape", np.array([1, -1, per_anchor], np.int64))
    return b.node("Reshape", [y, shape], name=name + ".anchors")


def blazeface(sparsity: float = 0.0, seed: int = 0, sparse_block: int = 1) -> onnx.ModelProto:
    """Build the detector. sparsity: share of zeros in every BlazeBlock's 1x1 conv, in blocks of
    `sparse_block` output channels (1: unstructured); the heads stay dense."""
    b = OnnxBuilder("blazeface_128", seed)
    x = b.input("image", [1, 3, 128, 128])
    x = b.relu(b.conv(_asym_pad(b, x, 1, 2, "stem.pad"), 3, 24, 5, 2, name="stem", pad=0), name="stem.relu")
    c, outs = 24, {}
    for stage, blocks in ((16, _BLOCKS_16), (8, _BLOCKS_8)):
        for i, (cout, stride) in enumerate(blocks):
            x, c = _block(b, x, c, cout, stride, f"b{stage}_{i}", sparsity, sparse_block), cout
        outs[stage] = (x, c)
    scores = [_head(b, outs[s][0], outs[s][1], 1, a, f"scores{s}") for s, a in zip((16, 8), _ANCHORS)]
    boxes = [_head(b, outs[s][0], outs[s][1], 16, a, f"boxes{s}") for s, a in zip((16, 8), _ANCHORS)]
    return b.finish([b.node("Concat", scores, name="scores", axis=1), b.node("Concat", boxes, name="boxes", axis=1)])
