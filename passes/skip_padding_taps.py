"""SkipPaddingTaps: a conv whose taps read only padding over parts of its output is split into those parts.

A dilated conv on a small map (DeepLabV3's ASPP: 3x3 taps 12-36 pixels apart on a 14x14 map at 224x224
input) has taps that fall in the zero padding for most output pixels; the conv kernels still multiply
them. Along each spatial axis the output indices fall into runs that see the same valid taps (always a
contiguous range of the kernel's taps); every pair of a row run and a column run is one region, computed as
a conv with just its valid taps, no padding, on the slice of the input those taps read. The regions are
concatenated back along W, then H; bias and activations follow on the whole map as before. Exact (the
dropped products are zeros), up to float summation order.

    conv2d(x, W, padding=p, dilation=d)  =>  concat_H(concat_W(conv2d(slice(x), W[.., ty, tx], dilation=d) ...))

Applies to NCHW convs with constant weights and no more than MAX_RUNS runs per axis, where the taps
computed drop below KEEP_SHARE of the conv's and at least MIN_SAVED multiply-adds go (the extra kernels and the
concats are not free).
NOTE: runs just before ConvertToBlockedLayout, which keeps the slices and concats blocked.
"""
from __future__ import annotations

import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, const_np, is_const, op_name, rewrite_main, rewriter, static_shape

NAME = "SkipPaddingTaps"
MAX_RUNS = 3          # runs of output indices per axis (3: a border run each side of the middle)
KEEP_SHARE = 0.75     # split only where the regions compute at most this share of the conv's taps
MIN_SAVED = 2_000_000  # ... and skip at least this many multiply-adds (tens of microseconds: more than the extra
                       # kernels cost; a 3x3 conv on a 4x4 map skips a third of its taps, but few multiply-adds)


def axis_runs(size_in: int, size_out: int, k: int, stride: int, pad: int, dilation: int) -> list[tuple]:
    """[(first output, count, first valid tap, taps)] along one axis: consecutive outputs reading the same
    taps inside the input (a contiguous range of them); a run with no valid tap has taps 0."""
    runs: list[tuple] = []
    for o in range(size_out):
        valid = [t for t in range(k) if 0 <= o * stride - pad + t * dilation < size_in]
        key = (valid[0], len(valid)) if valid else (0, 0)
        if runs and (runs[-1][2], runs[-1][3]) == key:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, *key)
        else:
            runs.append((o, 1, *key))
    return runs


@rewriter
class _Split(BindingRewriter):
    def rewrite(self, var, value):
        if op_name(value) != "relax.nn.conv2d":
            return None
        a = value.attrs
        x, w = value.args
        xs, ws, ys = static_shape(x), static_shape(w), static_shape(var)
        if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW" \
                or not is_const(w) or xs is None or ws is None or ys is None:
            return None
        (kh, kw), (sh, sw), (dh, dw) = ws[2:], [int(v) for v in a.strides], [int(v) for v in a.dilation]
        top, left = int(a.padding[0]), int(a.padding[1])
        rows = axis_runs(xs[2], ys[2], kh, sh, top, dh)
        cols = axis_runs(xs[3], ys[3], kw, sw, left, dw)
        if all(r[3] == kh for r in rows) and all(c[3] == kw for c in cols):
            return None            # every output reads every tap inside the input: nothing to skip
        taps = sum(r[1] * r[3] for r in rows) * sum(c[1] * c[3] for c in cols)
        share = taps / (ys[2] * ys[3] * kh * kw)
        saved = (1 - share) * ys[1] * ys[2] * ys[3] * ws[1] * kh * kw
        if share > KEEP_SHARE or saved < MIN_SAVED:
            return None            # a border of padding taps, as every padded conv has: not worth splitting
        if len(rows) > MAX_RUNS or len(cols) > MAX_RUNS or any(r[3] == 0 for r in rows + cols):
            changelog.skip(NAME, var.name, f"{len(rows)} x {len(cols)} output regions (at most {MAX_RUNS} x "
                                           f"{MAX_RUNS}, each reading the input): kept whole")
            return None
        weights = const_np(w)
        bands = []
        for r0, rn, ty, nty in rows:
            parts = []
            for c0, cn, tx, ntx in cols:
                iy, ix = r0 * sh - top + ty * dh, c0 * sw - left + tx * dw
                hy, hx = (rn - 1) * sh + (nty - 1) * dh + 1, (cn - 1) * sw + (ntx - 1) * dw + 1
                part = self.emit(relax.op.strided_slice(x, axes=[2, 3], begin=[iy, ix], end=[iy + hy, ix + hx]),
                                 "taps_in")
                sub = relax.const(weights[:, :, ty:ty + nty, tx:tx + ntx].copy())
                parts.append(relax.op.nn.conv2d(part, sub, strides=a.strides, padding=[0, 0, 0, 0],
                                                dilation=a.dilation, groups=int(a.groups)))
            bands.append(parts[0] if len(parts) == 1 else
                         relax.op.concat([self.emit(p, "taps") for p in parts], axis=3))
        changelog.record(NAME, "split_conv", var.name, regions=[len(rows), len(cols)], tap_share=round(share, 3))
        # NOTE: the binding's value is a call (the last conv or concat), not a variable: later passes read ops
        return bands[0] if len(bands) == 1 else relax.op.concat([self.emit(b, "taps_w") for b in bands], axis=2)


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class SkipPaddingTaps:
    """Split convs whose taps read only padding over parts of the output into regions without those taps."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _Split)[0]
