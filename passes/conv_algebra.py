"""Convolutions as exact linear maps: composing two convs into one, and a float64 numpy reference conv.

A step is one NCHW conv (dense, or depthwise with one filter per channel) with its bias. Two steps
with nothing non-linear between them are one affine map; `compose` gives the conv of its linear
part, or says why that conv would not equal the original at the borders.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


class NotExact(Exception):
    """Merging these steps would change the result (the message says why)."""


@dataclass
class ConvStep:
    """One conv: weight OIHW in float64 ((C, 1, kh, kw) when depthwise), stride, zero padding, bias."""

    weight: np.ndarray
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]      # top, left, bottom, right (Relax's order)
    depthwise: bool
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    bias: np.ndarray | None = None      # [O]
    name: str = ""

    @property
    def kernel(self) -> tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[0] if self.depthwise else self.weight.shape[1])

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    def flops(self) -> float:
        """Multiply-adds times two for one image."""
        o, i, kh, kw = self.weight.shape
        return 2.0 * o * i * kh * kw * self.out_hw[0] * self.out_hw[1]


def _border_why(a: ConvStep, b: ConvStep) -> str:
    """Why b's zero padding of a's output differs from padding a's input (empty when it does not).

    b pads a's output with zeros; the merged conv instead applies a to padded input. They agree
    when a, evaluated one row/column outside its output, reads only padding of its own input."""
    for axis, (lo, hi) in enumerate(((0, 2), (1, 3))):
        k, s = a.kernel[axis], a.stride[axis]
        if b.pad[lo] > 0 and k > s + a.pad[lo]:
            return f"{b.name} pads a tensor that {a.name} ({k}x{k}) computes from real input at the border"
        if b.pad[hi] > 0 and a.out_hw[axis] * s - a.pad[lo] < a.in_hw[axis]:
            return f"{b.name} pads a tensor that {a.name} ({k}x{k}) computes from real input at the border"
    return ""


def compose(a: ConvStep, b: ConvStep) -> ConvStep:
    """The conv equal to b(a(x)) without biases: kernel (k2-1)*s1+k1, stride s1*s2, padding p1+p2*s1."""
    if b.in_channels != a.out_channels or tuple(b.in_hw) != tuple(a.out_hw):
        raise NotExact(f"{b.name} does not read {a.name}'s output shape")
    why = _border_why(a, b)
    if why:
        raise NotExact(why)
    (k1h, k1w), (k2h, k2w) = a.kernel, b.kernel
    s1h, s1w = a.stride
    kh, kw = (k2h - 1) * s1h + k1h, (k2w - 1) * s1w + k1w
    stride = (s1h * b.stride[0], s1w * b.stride[1])
    pad = [a.pad[0] + b.pad[0] * s1h, a.pad[1] + b.pad[1] * s1w, 0, 0]
    for axis, k in ((0, kh), (1, kw)):   # bottom/right: just enough for the original output size
        h, s, oh = a.in_hw[axis], stride[axis], b.out_hw[axis]
        pad[2 + axis] = max(0, (oh - 1) * s + k - h - pad[axis])
        if (h + pad[axis] + pad[2 + axis] - k) // s + 1 != oh:
            raise NotExact(f"{a.name}+{b.name}: merged conv would need cropping")
    depthwise = a.depthwise and b.depthwise
    w1, w2 = a.weight, b.weight
    if depthwise:
        w = np.zeros((w1.shape[0], 1, kh, kw))
    elif a.depthwise:
        w = np.zeros((w2.shape[0], w1.shape[0], kh, kw))
    else:
        w = np.zeros((w2.shape[0], w1.shape[1], kh, kw))
    for r in range(k2h):
        for c in range(k2w):
            tap = w2[:, :, r, c]
            rows, cols = slice(r * s1h, r * s1h + k1h), slice(c * s1w, c * s1w + k1w)
            if depthwise:
                w[:, :, rows, cols] += tap[:, :, None, None] * w1
            elif b.depthwise:                  # dense a, then one filter per channel
                w[:, :, rows, cols] += tap[:, 0, None, None, None] * w1
            elif a.depthwise:                  # one filter per channel, then dense b
                w[:, :, rows, cols] += tap[:, :, None, None] * w1[None, :, 0]
            else:
                w[:, :, rows, cols] += np.einsum("om,mcij->ocij", tap, w1)
    return ConvStep(w, stride, tuple(pad), depthwise, a.in_hw, b.out_hw, None, f"{a.name}+{b.name}")


def add_identity(step: ConvStep) -> ConvStep | None:
    """step + the identity (a residual add folded into the centre tap), or None when it cannot be.

    Needs stride 1, as many outputs as inputs in channels and space, and the output pixel (i, j)
    reading input (i, j) through the tap at (pad top, pad left)."""
    t, l = step.pad[0], step.pad[1]
    kh, kw = step.kernel
    if (step.stride != (1, 1) or step.in_channels != step.out_channels or tuple(step.in_hw) != tuple(step.out_hw)
            or not (0 <= t < kh and 0 <= l < kw)):
        return None
    w = step.weight.copy()
    if step.depthwise:
        w[:, 0, t, l] += 1.0
    else:
        idx = np.arange(step.out_channels)
        w[idx, idx, t, l] += 1.0
    return replace(step, weight=w)


def conv_np(x: np.ndarray, step: ConvStep) -> np.ndarray:
    """Reference conv in float64: x [C, H, W] -> [O, OH, OW], bias included."""
    t, l, b, r = step.pad
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (t, b), (l, r)))
    oh, ow = step.out_hw
    sh, sw = step.stride
    out = np.zeros((step.out_channels, oh, ow))
    kh, kw = step.kernel
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            if step.depthwise:
                out += step.weight[:, 0, i, j][:, None, None] * patch
            else:
                out += np.einsum("oc,chw->ohw", step.weight[:, :, i, j], patch)
    if step.bias is not None:
        out += step.bias[:, None, None]
    return out


def chain_constant(steps: list[ConvStep], residual: bool) -> np.ndarray:
    """chain(0): what the chain outputs for a zero input, [O, OH, OW] (biases seen through later convs)."""
    z = np.zeros((steps[0].in_channels, *steps[0].in_hw))
    for s in steps:
        z = conv_np(z, s)
    return z  # a residual adds the zero input: nothing


def merge(steps: list[ConvStep], residual: bool) -> tuple[ConvStep, np.ndarray, bool]:
    """One conv equal to the chain's linear part, its output constant, and whether the residual folded in.

    Raises NotExact when the chain cannot become one conv exactly."""
    merged = steps[0]
    for s in steps[1:]:
        merged = compose(merged, s)
    merged = replace(merged, bias=None, name="+".join(s.name for s in steps))
    folded = False
    if residual:
        with_id = add_identity(merged)
        if with_id is not None:
            merged, folded = with_id, True
    return merged, chain_constant(steps, residual), folded


def as_dense(step: ConvStep) -> np.ndarray:
    """The weight as a dense OIHW array (depthwise spread onto the diagonal)."""
    if not step.depthwise:
        return step.weight
    c = step.out_channels
    w = np.zeros((c, c, *step.kernel))
    w[np.arange(c), np.arange(c)] = step.weight[:, 0]
    return w
