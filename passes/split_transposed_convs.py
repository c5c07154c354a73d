"""SplitTransposedConvs: a transposed conv becomes stride x stride ordinary convs whose outputs interleave.

A transposed conv with stride s scatters every input pixel into the output; along an axis, output o = q*s + r
(phase r) receives only the taps t = (r + p) mod s, + s, + 2s, ... of the kernel, each from input q + d - j
(d = (r + p) // s, j counting those taps). So the outputs of one phase are an ordinary stride-1 conv of the
input with those taps, flipped, and the transposed conv is s_h x s_w such convs (each Cin -> Cout on the input's
grid) whose outputs interleave pixel by pixel: no multiply by an inserted zero, and the convs run the target's
direct conv kernels. With TVM's own transposed-conv kernel a U-Net decoder ran at 0.05x ONNX Runtime's speed
(benchmarks/REAL-EXPORTS-decoder-before.md; since: REAL-EXPORTS-decoder.md).

    conv2d_transpose(x, W, s, p)  =>  interleave_{ry, rx}( conv2d(x, flip(W[:, :, ty(ry)::s, tx(rx)::s])) )

Each phase computes ceil(out / s) rows and columns (the conv's padding, or a slice of the input where it would
be negative, gives that many); the interleaved result is cropped to the transposed conv's output. Exact up to
float summation order. Applies to NCHW / IOHW transposed convs with constant float32 weights, dilation 1, any
groups, padding and output padding; others stay as they are, with a log line.
NOTE: phase 1, after FoldScaleIntoConv; the convs it writes go through everything later passes do to convs.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, const_np, is_const, op_name, rewrite_main, rewriter, static_shape

NAME = "SplitTransposedConvs"


def phase_taps(size_in: int, size_out: int, k: int, stride: int, pad: int) -> list[dict]:
    """Per output phase r (outputs r, r + s, ...) along one axis: its kernel taps (`taps`, in the order the
    ordinary conv reads them: flipped), the input slice it reads (`begin`, `end`, clipped to the input) and the
    ordinary conv's padding before / after that slice, so that it computes ceil(size_out / s) outputs."""
    q = -(-size_out // stride)
    phases = []
    for r in range(stride):
        t0 = (r + pad) % stride
        taps = list(range(t0, k, stride))[::-1]            # flipped: the first tap reads the lowest input index
        first = (r + pad) // stride - (len(taps) - 1)      # input index the first tap reads for output q = 0
        last = first + q - 1 + len(taps) - 1               # ... the last tap for output q - 1
        begin, end = max(first, 0), min(last + 1, size_in)
        phases.append({"taps": taps, "begin": begin, "end": max(end, begin),
                       "pad": (begin - first, last + 1 - max(end, begin))})
    return phases


def conv_weights(w: np.ndarray, groups: int) -> np.ndarray:
    """IOHW transposed-conv weights [Cin, Cout / g, kh, kw] -> OIHW conv weights [Cout, Cin / g, kh, kw]."""
    cin, cog, kh, kw = w.shape
    cig = cin // groups
    return w.reshape(groups, cig, cog, kh, kw).transpose(0, 2, 1, 3, 4).reshape(groups * cog, cig, kh, kw)


@rewriter
class _Split(BindingRewriter):
    def rewrite(self, var, value):
        if op_name(value) != "relax.nn.conv2d_transpose":
            return None
        a = value.attrs
        x, w = value.args
        xs, ws, ys = static_shape(x), static_shape(w), static_shape(var)
        why = None
        if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "IOHW" or str(a.out_layout) != "NCHW":
            why = f"layout {a.data_layout} / {a.kernel_layout} (NCHW / IOHW only)"
        elif xs is None or ys is None or not is_const(w):
            why = "dynamic shape or weights computed at run time"
        elif any(int(d) != 1 for d in a.dilation):
            why = f"dilation {[int(d) for d in a.dilation]}"
        elif x.ty.dtype != "float32" or var.ty.dtype != "float32":
            why = f"dtype {x.ty.dtype}"
        if why:
            changelog.skip(NAME, var.name, f"{why}: TVM's transposed conv kernel computes it")
            return None
        groups, (sh, sw) = int(a.groups), [int(v) for v in a.strides]
        top, left = int(a.padding[0]), int(a.padding[1])
        weights = conv_weights(const_np(w), groups)
        cout, (oh, ow) = weights.shape[0], ys[2:]
        rows = phase_taps(xs[2], oh, ws[2], sh, top)
        cols = phase_taps(xs[3], ow, ws[3], sw, left)
        qh, qw = -(-oh // sh), -(-ow // sw)
        bands = [self._interleave([self._phase(x, xs, weights, ry, rx, groups, (cout, qh, qw)) for rx in cols],
                                  4, (1, cout, qh, qw * sw)) for ry in rows]
        out = self._interleave(bands, 3, (1, cout, qh * sh, qw * sw))
        changelog.record(NAME, "split_conv_transpose", var.name, phases=[sh, sw],
                         taps=[[len(ry["taps"]) for ry in rows], [len(rx["taps"]) for rx in cols]])
        if (qh * sh, qw * sw) != (oh, ow):
            out = relax.op.strided_slice(self.emit(out, "phases"), axes=[2, 3], begin=[0, 0], end=[oh, ow])
        # NOTE: the binding's value is a call (a conv, reshape or slice), not a variable: later passes read ops
        return out

    def _phase(self, x, xs, weights, ry, rx, groups, shape):
        """One phase: an ordinary conv of the input with that phase's taps (zeros where it has none)."""
        if not ry["taps"] or not rx["taps"] or ry["end"] == ry["begin"] or rx["end"] == rx["begin"]:
            return relax.op.zeros(relax.ShapeExpr([1, *shape]), "float32")
        if (ry["begin"], ry["end"], rx["begin"], rx["end"]) != (0, xs[2], 0, xs[3]):
            x = self.emit(relax.op.strided_slice(x, axes=[2, 3], begin=[ry["begin"], rx["begin"]],
                                                 end=[ry["end"], rx["end"]]), "phase_in")
        sub = weights[:, :, ry["taps"]][:, :, :, rx["taps"]]
        return relax.op.nn.conv2d(x, relax.const(np.ascontiguousarray(sub)), strides=[1, 1],
                                  padding=[ry["pad"][0], rx["pad"][0], ry["pad"][1], rx["pad"][1]], groups=groups)

    def _interleave(self, parts, axis, shape):
        """[1, C, a, b] tensors interleaved along H (axis 3) or W (axis 4): stacked on a new axis after it and
        merged (one part: itself)."""
        if len(parts) == 1:
            return parts[0]
        stacked = self.emit(relax.op.stack([self.emit(p, "phase") for p in parts], axis=axis), "interleave")
        return relax.op.reshape(stacked, shape)


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class SplitTransposedConvs:
    """Compute transposed convs as stride x stride ordinary convs whose outputs interleave."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _Split)[0]
