"""Dense kxk and 1x1 convolutions in NCHW{c}c: a register tile of output pixels x channel blocks.

Applies to `relax.nn.conv2d` with groups == 1, kernel OHWI{b}o, output NCHW{b}c, input NCHW{c}c or
plain NCHW (the stem reading an RGB image). The inner loop broadcasts one input value and FMAs it
into P x OB accumulator vectors, one per output pixel and channel block of the tile.
Knobs: `pixel_tile` (P), `oc_blocks` (OB), `inline_pad`, `unroll_ci`; `knob_space` lists the
settings `shrinkc tune` times. A target caps the default OB and P with `kernel_defaults["max_oc_blocks"]` / `["max_pixel_tile"]`;
its `kernel_defaults["conv1x1"]` overrides those (and the knobs) for 1x1 convs only.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, te, tirx

from schedules.rule import KERNEL_ATTR, Scheduled, ScheduleRule, best_divisor, finish_tile, inline_producers, \
    kernel_block, kernel_extents, schedule_injective, tile_in_registers

KIND = "conv2d_nchwc"
TILE_SLACK = 2  # tuning also tries register tiles up to this many times the accumulator budget (spills)


def padded(data: te.Tensor, pads: list[int], h_axis: int = 2) -> te.Tensor:
    """Zero-pad H and W (pads = top, left, bottom, right); a no-op without padding."""
    top, left, bottom, right = pads
    if not any(pads):
        return data
    shape = list(data.shape)
    h, w = int(shape[h_axis]), int(shape[h_axis + 1])
    shape[h_axis] = h + top + bottom
    shape[h_axis + 1] = w + left + right

    def value(*idx):
        y, x = idx[h_axis], idx[h_axis + 1]
        src = list(idx)
        src[h_axis], src[h_axis + 1] = y - top, x - left
        # likely(): lets LoopPartition split border tiles from interior ones (no guard inside)
        inside = tvm.tirx.likely(tvm.tirx.all(y >= top, y < h + top, x >= left, x < w + left))
        return tvm.tirx.if_then_else(inside, data[tuple(src)], tvm.tirx.const(0.0, data.dtype))

    return te.compute(shape, value, name="pad")


def conv2d_nchwc(data: te.Tensor, kernel: te.Tensor, strides, padding, dilation, groups: int = 1) -> te.Tensor:
    """out[n, ob, y, x, o] = sum_{kh, kw, ci} in[n, g * cin + ci, y*s+kh*d, x*s+kw*d] * k[ob, kh, kw, ci, o], with
    g = 0, or (groups > 1, each a whole number of output blocks) the group of output block ob and cin its input
    channels."""
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    blocked_in = len(data.shape) == 5
    n, _, h, w = (int(v) for v in data.shape[:4])
    cob, kh_, kw_, cin, bo = (int(v) for v in kernel.shape)
    blocks_per_group = cob // groups
    bi = int(data.shape[4]) if blocked_in else 1
    top, left, bottom, right = (int(v) for v in padding)
    oh = (h + top + bottom - dh * (kh_ - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw_ - 1) - 1) // sw + 1
    src = padded(data, [top, left, bottom, right])
    kh = te.reduce_axis((0, kh_), "kh")
    kw = te.reduce_axis((0, kw_), "kw")
    ci = te.reduce_axis((0, cin), "ci")

    def load(b, c, y, x):
        if blocked_in:
            return src[b, c // bi, y, x, c % bi]
        return src[b, c, y, x]

    return te.compute(
        (n, cob, oh, ow, bo),
        lambda b, ob, y, x, o: te.sum(load(b, ci if groups == 1 else ob // blocks_per_group * cin + ci,
                                           y * sh + kh * dh, x * sw + kw * dw) * kernel[ob, kh, kw, ci, o],
                                      axis=[kh, kw, ci]),
        name="conv",
        attrs={KERNEL_ATTR: KIND, "kh": kh_, "kw": kw_, "stride": sh, "pad": [top, left, bottom, right],
               "in_block": bi if blocked_in else 0},
    )


def accumulator_budget(block: int, spec) -> int:
    """How many accumulator vectors of `block` floats a register tile may hold.

    NOTE: the tile stays in registers only because passes/keep_tiles_on_stack.py keeps its buffer
    a stack array (TVM would heap-allocate it); leave room for the weight vectors and a broadcast."""
    regs_per_vec = max(1, block // spec.vector_lanes)
    reserve = spec.vector_registers // 3 + 1     # weight vectors, a broadcast, addresses (32 -> 11)
    return max(2, (spec.vector_registers - reserve) // regs_per_vec)


def row_tile_options(oh: int, ow: int) -> list[int]:
    """Pixel tiles whose region is a rectangle: divisors of the row, or whole rows (k*ow, k | oh).

    NOTE: a tile straddling rows makes the write-back region a bounding box, and the kernel then
    writes pixels it never computed."""
    return [d for d in range(1, ow + 1) if ow % d == 0] + [k * ow for k in range(2, oh + 1) if oh % k == 0]


def row_tile(oh: int, ow: int, target: int) -> int:
    """The largest rectangular pixel tile not above `target` (the smallest if none is)."""
    options = row_tile_options(oh, ow)
    fitting = [p for p in options if p <= target]
    return max(fitting) if fitting else min(options)


def register_tile(oh: int, ow: int, cob: int, budget: int, max_oc_blocks: int = 4,
                  max_pixels: int | None = None) -> tuple[int, int]:
    """(pixels P, channel blocks OB) of the register tile: at most `budget` accumulators, fewest
    loads per FMA ((P + OB) / (P * OB): P broadcasts and OB weight vectors feed P*OB FMAs), OB and P
    capped where a target says so (1 pixel always fits). Where the pixel cap leaves only 1-pixel tiles (rows
    of a prime width above it, as SqueezeNet's 13x13 maps), the cap is dropped: a tile of one pixel loads a
    weight vector per FMA."""
    best = None
    for p in row_tile_options(oh, ow):
        for ob in range(1, max_oc_blocks + 1):
            if cob % ob or p * ob > budget or (max_pixels and p > max_pixels):
                continue
            key = ((p + ob) / (p * ob), -p * ob)
            if best is None or key < best[0]:
                best = (key, p, ob)
    if max_pixels and best is not None and best[1] == 1 and ow > 1:
        uncapped = register_tile(oh, ow, cob, budget, max_oc_blocks)
        if uncapped[0] > 1:
            return uncapped
    return (best[1], best[2]) if best else (1, 1)


def default_register_tile(oh: int, ow: int, cob: int, bo: int, spec, defaults: dict | None = None) -> tuple[int, int]:
    """register_tile with the target's accumulator budget and its caps (`max_oc_blocks`, `max_pixel_tile`,
    from `defaults` where given, else the target's kernel_defaults)."""
    d = spec.kernel_defaults if defaults is None else defaults
    return register_tile(oh, ow, cob, accumulator_budget(bo, spec), d.get("max_oc_blocks", 4), d.get("max_pixel_tile"))


def register_tile_options(oh: int, ow: int, cob: int, bo: int, spec) -> list[tuple[int, int]]:
    """Every (P, OB) tuning may try: up to 4 channel blocks, up to TILE_SLACK x the accumulator budget."""
    limit = TILE_SLACK * accumulator_budget(bo, spec)
    return [(p, ob) for p in row_tile_options(oh, ow) for ob in range(1, 5) if cob % ob == 0 and p * ob <= limit]


def pixel_tile_loops(sch, y, x, ow: int, tile: int):
    """Split the (y, x) loops into outer loops and ONE inner pixel loop of `tile` pixels."""
    if tile <= ow:
        x_o, x_i = sch.split(x, [None, tile])
        return [y, x_o], x_i
    y_o, y_i = sch.split(y, [None, tile // ow])
    return [y_o], sch.fuse(y_i, x)


def register_tiled(sch, conv, n, ob, y, x, ow: int, knobs: dict, reduce: list, inner: list):
    """The P x OB register tile of a conv block: output channel blocks split by `oc_blocks`, (y, x) by
    `pixel_tile`, loops ordered (n, ob_o, pixel tiles, *reduce, ob_i, pixels, *inner), the accumulators kept in
    registers (tile_in_registers), the outer loops fused and parallel, ob_i and the pixels unrolled.
    Returns what finish_tile takes: (the accumulator write-back block, the loops left of it)."""
    ob_o, ob_i = sch.split(ob, [None, knobs["oc_blocks"]])
    outer, pix = pixel_tile_loops(sch, y, x, ow, knobs["pixel_tile"])
    sch.reorder(n, ob_o, *outer, *reduce, ob_i, pix, *inner)
    outer = [n, ob_o, *outer]
    wb, left = tile_in_registers(sch, conv, outer[-1])
    sch.parallel(sch.fuse(*outer))
    sch.unroll(ob_i)
    sch.unroll(pix)
    return wb, left


class Conv2dNCHWc(ScheduleRule):
    """Dense kxk and 1x1 convolutions in NCHW{c}c with a P x OB register tile."""

    kind = KIND

    def default_knobs(self, info: dict, spec) -> dict:
        d = spec.kernel_defaults
        if info.get("kh", 1) == 1:
            d = {**d, **d.get("conv1x1", {})}
        p, ob = default_register_tile(info["oh"], info["ow"], info["cob"], info["bo"], spec, d)
        # a padded copy of the input costs one pass over it; guarded loads cost a branch per tap.
        # Measured (Zen 4, 1 thread): with tiles of 2-4 channel blocks, stride-1 kxk convs over more
        # than 7x7 pixels ran ~2x faster from a padded copy (merged DepthShrinker blocks); stride 2,
        # the stem and 7x7 maps did not. A target may turn the copy off (`padded_copy`).
        copy = (info.get("stride", 1) == 1 and info.get("kh", 1) > 1 and info["oh"] * info["ow"] > 49
                and spec.kernel_defaults.get("padded_copy", True))
        # NOTE: a stride-1 conv padded more on one side than the other (a transposed conv's phases,
        # SplitTransposedConvs) always reads a padded copy: with guarded loads TVM's loop partitioning split the
        # unrolled pixel loop at a point known only at run time and the build failed ("Cannot unroll non-constant
        # loop": 1x2 and 2x1 kernels padded on one side)
        top, left, bottom, right = info.get("pad", (0, 0, 0, 0))
        copy = copy or (info.get("stride", 1) == 1 and (top, left) != (bottom, right))
        # the input channels of a block unrolled under the unrolled taps: on 5x5 kernels (merged EfficientNet-Lite
        # blocks) that is 25 x 16 x pixels x channel blocks FMAs, which LLVM took 2-4 s to build per kernel; as a loop
        # they built in 0.5-0.7 s and ran no slower (ad-hoc interleaved timings, Zen 4, 1 thread, 5x5 convs of 40-192
        # channels at 7x7-28x28; 3x3 ran and built the same either way). Other kernel sizes keep the unrolling (not
        # measured)
        taps = info.get("kh", 1) * info.get("kw", info.get("kh", 1))
        return {"pixel_tile": p, "oc_blocks": ob, "inline_pad": not copy, "unroll_ci": taps != 25,
                **d.get(KIND, {})}

    def knob_space(self, func, spec):
        if (found := kernel_extents(func, KIND)) is None:
            return []
        (_, cob, oh, ow, bo, *_), ann = found
        tiles = register_tile_options(oh, ow, cob, bo, spec)
        pads = [True, False] if any(ann["pad"]) else [True]
        unrolls = [True, False] if ann["in_block"] > 1 else [True]
        return [{"pixel_tile": p, "oc_blocks": ob, "inline_pad": ip, "unroll_ci": u}
                for p, ob in tiles for ip in pads for u in unrolls]

    def apply(self, func, spec, knobs=None):
        sch = s_tir.Schedule(func)
        conv, ann = kernel_block(sch, KIND)
        if conv is None:
            return None
        n, ob, y, x, o, kh, kw, ci = sch.get_loops(conv)
        _, cob, oh, ow, bo = (int(sch.get(lp).extent) for lp in (n, ob, y, x, o))
        info = {"bo": bo, "cob": cob, "oh": oh, "ow": ow, "kh": ann["kh"], "kw": ann["kw"], "stride": ann["stride"],
                "pad": ann["pad"]}
        k = {**self.default_knobs(info, spec), **(knobs or {})}
        if k["inline_pad"]:
            inline_producers(sch, conv)
        else:
            for pad in sch.get_producers(conv):
                schedule_injective(sch, pad, spec.vector_lanes)
        reduce = [kh, kw, ci]
        if ann["in_block"] > 1:   # (c // b, c % b) become plain loop indices
            ci_o, ci_i = sch.split(ci, [None, ann["in_block"]])
            reduce = [kh, kw, ci_o, ci_i]
            if k["unroll_ci"]:
                sch.unroll(ci_i)
        wb, left = register_tiled(sch, conv, n, ob, y, x, ow, k, reduce, [o])
        sch.vectorize(o)
        if ann["kh"] * ann["kw"] <= 25:
            sch.unroll(kh)
            sch.unroll(kw)
        finish_tile(sch, conv, wb, kh, left, spec.vector_lanes)
        tile = f"{k['pixel_tile']}x{k['oc_blocks'] * bo}"
        name = f"f32_conv{ann['kh']}x{ann['kw']}_nchw{bo}c_{tile}"
        return Scheduled(sch.mod["main"], name, k)

