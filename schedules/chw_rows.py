"""Convolutions over CHW planes, computed a step of output rows at a time, vectorised along the width.

The shared code of the CHW kernels (f32_dwconv2d_chw, f32_spmm_dwconv2d_chw, f32_conv2d_dwconv2d_chw). A step
computes ROWS output rows of some output planes from some input planes, each input row loaded once
for every output row of the step that uses it, and keeps the step's output vectors in registers (at
most ACCUMULATORS, so wide rows go in column chunks). Nothing is copied or padded in memory:
- stride 1: each input row is loaded once, a vector at a time, and a tap at column offset d is a shuffle
  of two neighbouring vectors. (Loading each tap at its offset instead was load bound in the standalone
  depthwise kernel: most such loads straddle two cache lines. Shuffled taps ran clearly faster there on
  112-, 56- and 28-wide rows in ad-hoc interleaved timings on Zen 5, and no slower on 14- and 7-wide rows;
  inside the fused expand + depthwise kernel, whose planes are in cache, about the same.)
- stride 2: each input row is loaded as pairs of vectors and split into its even and odd columns by
  two shuffles; the taps are those vectors or a shuffle of two neighbours. Or (`split`) the kernel has
  split its input rows into even and odd columns once (split_planes), and every tap is a load.
A load that reaches past a row's ends is a masked load, and a tap with padding lanes is a masked FMA
(those lanes keep their sum), or, at stride 1 on rows that end in a partial vector (`zero_taps`), a tap
whose padding lanes are zeros: the kernels never touch memory outside their tensors, which tests check
against inaccessible pages. (Selecting zeros into the masked load's lanes instead let LLVM turn it into
a plain load that faulted there.) The row's last pixels are a masked store.
Rows whose taps all lie inside the image run in a loop; the few border rows are emitted one by one
with their out-of-image taps left out, so the loop has no conditions. A 3x3 stride-1 conv on rows narrower
than half a vector (7x7 planes at 16 lanes) puts two rows in each vector instead (RowConv.paired_planes):
full-width vectors where one row each would fill half-width ones (a little faster alone and fused, in
ad-hoc interleaved timings of MobileNetV2's 7x7 layers on Zen 5).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as I

from schedules.rule import SCHEDULED_ATTR

STRIDES = (1, 2)
ROWS = 2              # output rows per step: each input row's loads serve both (timed: 1, 2, 3, 4 rows)
ACCUMULATORS = 16     # output vectors in registers per step (AVX-512 and NEON have 32 vector registers)
F32 = "float32"
HSWISH = "hswish"     # an epilogue `clip` that is hard swish, x * clip(x + 3, 0, 6) / 6 (MobileNetV3)
SILU = "silu"         # an epilogue `clip` that is SiLU / swish, x * sigmoid(x) (EfficientNet-B0)
NAMED_CLIPS = (HSWISH, SILU)


def scheduled_kernel(name: str, params: list, body) -> tirx.PrimFunc:
    """A PrimFunc named `name`, marked `shrinkc.scheduled` and opaque to fusion, whose parameters are the
    buffers params = [(name, shape, dtype)] in order; body(*buffers) emits its statements."""
    with IRBuilder() as ib:
        with I.prim_func():
            I.func_name(name)
            I.func_attr({"tirx.noalias": True})
            body(*(I.arg(n, I.buffer(shape, dtype)) for n, shape, dtype in params))
    return ib.get().with_attr("global_symbol", name).with_attr(SCHEDULED_ATTR, 1).with_attr("op_pattern", 8)


def aligned_plane(pixels: int, lanes: int) -> int | None:
    """The padded plane (pixels rounded up to whole vectors) a CHW tensor of `pixels` pixels per channel
    is stored with when every plane should start on a vector boundary; None where planes already do."""
    return None if pixels % lanes == 0 else -(-pixels // lanes) * lanes


def output_planes(out, c: int, oh: int, ow: int, plane: int | None):
    """The kernel's output as [1, c, oh, ow]: `out` itself, or (plane set) a view of out [1, c, plane]
    whose channel planes are `plane` floats apart (the pixels past oh * ow are never written)."""
    if plane is None:
        return out
    return I.decl_buffer((1, c, oh, ow), F32, data=out.data, strides=[c * plane, plane, ow, 1])


def pixel_runs(pixels: int, max_vectors: int, lanes: int) -> list[tuple[int, int, int, int]]:
    """Split a plane's pixels into as few tiles of at most max_vectors vectors as cover it, sized evenly (a
    last tile of one vector would cost as much per non-zero weight as a full one), as runs of equal tiles
    (first pixel, tiles, whole vectors per tile, pixels of a last partial vector): the plane's partial
    vector, if any, ends the last tile, the only tile of its run."""
    shares = -(-pixels // lanes)                      # vectors, the partial one included
    ntiles = -(-shares // max_vectors)
    base, extra = divmod(shares, ntiles)              # `extra` tiles get one vector more, first
    runs, p0 = [], 0
    for count, nv in ((extra, base + 1), (ntiles - extra, base)):
        if count:
            runs.append((p0, count, nv, 0))
            p0 += count * nv * lanes
    rest = pixels % lanes
    if rest:                                          # the last tile: its last vector is partial
        first, count, nv, _ = runs.pop()
        if count > 1:
            runs.append((first, count - 1, nv, 0))
        runs.append((first + (count - 1) * nv * lanes, 1, nv - 1, rest))
    return runs


def planes_shape(c: int, h: int, w: int, plane: int | None) -> tuple:
    """The shape of a CHW tensor of c h x w planes: [1, c, h, w], or [1, c, plane] stored padded."""
    return (1, c, h, w) if plane is None else (1, c, plane)


def clipped(a, clip, vec: int):
    """The vector a clamped to clip = (lo, hi), or its hard swish / SiLU where clip is HSWISH / SILU; None
    clamps to the float32 range. vec 0: a is a scalar."""
    def const(v):
        return tirx.Broadcast(tirx.FloatImm(F32, v), vec) if vec else tirx.FloatImm(F32, v)
    if clip == SILU:       # sigmoid: vector arithmetic on CPUs (schedules/f32_exp_lowering.py)
        return a * tirx.sigmoid(a)
    if clip == HSWISH:     # the importer's order of operations: x * (clip(x + 3, 0, 6) / 6)
        return a * (tirx.Min(tirx.Max(a + const(3.0), const(0.0)), const(6.0)) / const(6.0))
    lo, hi = (-3.4e38, 3.4e38) if clip is None else clip
    return tirx.Min(tirx.Max(a, const(lo)), const(hi))


def row_vector(ow: int, lanes: int) -> int:
    """Vector width for output rows of `ow` pixels: the fewest vectors per row, then the least
    padding (7 -> 8 of 16 lanes, 14 -> 16, 56 -> 4 x 16, 112 -> 7 x 16); at least 2 lanes."""
    options = [v for v in (lanes, lanes // 2, lanes // 4) if v >= 2] or [2]
    return min(options, key=lambda v: (-(-ow // v), -(-ow // v) * v))


class _Row:
    """The vectors of one input row that a step's taps read, loaded on first use."""

    def __init__(self, src, lead: list, r: int | tirx.PrimExpr, w: int, vec: int, stride: int, split: bool = False,
                 zero_taps: bool = False):
        # the row is src[*lead, r, :]; split (stride 2): src[*lead, 0 / 1, r, :] are its even / odd columns;
        # zero_taps (stride 1): lanes outside the row are zeros, so no tap needs a masked FMA (RowConv.zero_taps)
        self.src, self.lead, self.r, self.w, self.vec, self.stride = src, lead, r, w, vec, stride
        self.split, self.zero_taps = split, zero_taps
        self.zero = tirx.Broadcast(tirx.FloatImm(F32, 0.0), vec)
        # NOTE: a zero LLVM cannot see is one: shuffles with a known zero vector became vexpandps (slow here)
        self.opaque_zero = tirx.call_llvm_pure_intrin(f"float32x{vec}", "llvm.arithmetic.fence", self.zero)
        self.phase: dict = {}      # stride 2: j -> (even, odd) columns of vectors 2j, 2j + 1
        self.vectors: dict = {}    # stride 1: j -> the row's vector j

    def load(self, col0: int, lead: list | None = None, w: int | None = None):
        """Input columns col0 .. col0 + vec - 1 of the row (of src[*lead, r, :] of width w where given). Lanes
        outside [0, w) are zeros with zero_taps, else undefined (a masked load leaves them poison): the caller
        masks them out of its FMA, see `lanes_inside`."""
        vec, w, lead = self.vec, self.w if w is None else w, self.lead if lead is None else lead
        if col0 >= w or col0 + vec <= 0:
            return self.zero
        idx = tirx.Ramp(col0, 1, vec)
        if col0 >= 0 and col0 + vec <= w:
            return tirx.BufferLoad(self.src, [*lead, self.r, idx])
        inside = lanes_inside(col0, 1, vec, w)
        value = tirx.call_intrin(f"float32x{vec}", "tirx.masked_load", self.src, *lead, self.r, idx, inside)
        if not self.zero_taps:
            return value
        # NOTE: lanes n.. taken from a zero vector by a shuffle (col0 >= 0: a stride-1 row's vector); a Select of
        # zeros around the masked load became a plain load that reached past the tensor (the guarded-page test)
        n = w - col0
        return tirx.Shuffle([value, self.opaque_zero], [i if i < n else vec + i for i in range(vec)])

    def _phases(self, j: int):
        """(even, odd) columns of input columns 2*j*vec .. 2*(j+1)*vec - 1, as two vectors."""
        if j not in self.phase:
            vec = self.vec
            if 2 * j * vec >= self.w or 2 * (j + 1) * vec <= 0:
                self.phase[j] = (self.zero, self.zero)
            else:
                a = I.Bind(self.load(2 * j * vec))
                b = I.Bind(self.load(2 * j * vec + vec))
                self.phase[j] = (I.Bind(tirx.Shuffle([a, b], [2 * i for i in range(vec)])),
                                 I.Bind(tirx.Shuffle([a, b], [2 * i + 1 for i in range(vec)])))
        return self.phase[j]

    def _vector(self, j: int):
        """Input columns j * vec .. (j + 1) * vec - 1 of the row, loaded once per step (None outside the row)."""
        if j not in self.vectors:
            self.vectors[j] = I.Bind(self.load(j * self.vec)) if 0 <= j * self.vec < self.w else None
        return self.vectors[j]

    def tap(self, o0: int, d: int):
        """Input columns stride * o + d for the output columns o0 .. o0 + vec - 1 (o0 a multiple of vec)."""
        if self.stride == 1:
            # lanes of the row's vectors j and j + 1 (one two-register shuffle); past the row's ends a zero vector
            # (zero_taps: the padding lanes come out zero) or the vector itself (a rotation: those lanes are masked
            # out of the FMA) stands in for the missing neighbour
            vec, j, off = self.vec, (o0 + d) // self.vec, (o0 + d) % self.vec
            here, after = self._vector(j), self._vector(j + 1)
            if off == 0:
                return here if here is not None else self.zero
            if self.zero_taps:
                here, after = (v if v is not None else self.opaque_zero for v in (here, after))
            else:
                here, after = here if here is not None else after, after if after is not None else here
            return tirx.Shuffle([here, after], [off + i for i in range(vec)])
        vec, parity, start = self.vec, d % 2, o0 + d // 2    # column 2 * (start + i) + parity
        if self.split:                                         # column start + i of the parity's plane
            return self.load(start, [*self.lead, parity], (self.w + 1 - parity) // 2)
        j0, off = start // vec, start % vec
        first = self._phases(j0)[parity]
        if off == 0:
            return first
        return tirx.Shuffle([first, self._phases(j0 + 1)[parity]], [off + i for i in range(vec)])


def split_columns(src, lead: list, dst, dst_lead: list, r, w: int, vec: int) -> None:
    """dst[*dst_lead, 0 / 1, r, :] = the even / odd columns of the row src[*lead, r, :] of w floats (whole
    vectors read, two shuffles per pair): what a split RowConv reads in place of the row."""
    row = _Row(src, lead, r, w, vec, 2)
    for j in range(-(-w // (2 * vec))):
        for parity, value in enumerate(row._phases(j)):
            n = min(vec, (w + 1 - parity) // 2 - j * vec)
            if n > 0:
                store(dst, value, [*dst_lead, parity, r], j * vec, n, vec)


def split_planes(src, lead: list, c: int, h: int, w: int, vec: int):
    """A new buffer [c, 2, h, (w + 1) // 2] of the even / odd columns of the planes src[*lead, i] (i < c, each
    h rows of w floats), filled by one parallel pass over their rows (split_columns): a split RowConv's input."""
    halves = I.alloc_buffer((c, 2, h, (w + 1) // 2), F32, scope="global")
    with I.parallel(0, c * h) as ir:
        split_columns(src, [*lead, ir // h], halves, [ir // h], ir % h, w, vec)
    return halves


def lanes_inside(col0: int, step: int, vec: int, w: int, used: int | None = None):
    """The lanes whose input column col0 + step * i lies in [0, w), as a vector of booleans; lanes from
    `used` on count as inside (their results are never stored)."""
    cols = tirx.Ramp(col0, step, vec)
    inside = tirx.And(cols >= tirx.Broadcast(0, vec), cols < tirx.Broadcast(w, vec))
    if used is not None and used < vec:
        inside = tirx.Or(inside, tirx.Ramp(0, 1, vec) >= tirx.Broadcast(used, vec))
    return inside


class Planes:
    """What one RowConv pass computes: output planes out[*lead, y, x] from input planes src[*lead, r, c]."""

    def __init__(self, inputs: list, outputs: list, weight, bias):
        self.inputs = inputs      # [(buffer, lead indices)] read
        self.outputs = outputs    # [(buffer, lead indices)] written
        self.weight = weight      # (o, i, kh, kw) -> the scalar weight of input plane i in output plane o
        self.bias = bias          # o -> the scalar bias of output plane o


class RowConv:
    """A kxk conv over CHW planes computed one output row step at a time: the shapes, and the TIR."""

    def __init__(self, h: int, w: int, k: int, stride: int, pads, *, clip=None, lanes: int = 16,
                 rows: int = ROWS, split: bool = False):
        assert stride in STRIDES and (stride == 2 or not split), (stride, split)
        self.h, self.w, self.k, self.s, self.rows = h, w, k, stride, rows
        self.split = split     # stride 2, input planes given as their even and odd columns (split_columns)
        self.top, self.left, bottom, right = (int(p) for p in pads)
        self.oh = (h + self.top + bottom - k) // stride + 1
        self.ow = (w + self.left + right - k) // stride + 1
        self.vec = row_vector(self.ow, lanes)
        self.nv = -(-self.ow // self.vec)
        self.clip = clip
        self.lanes = lanes
        # stride 1 on rows that end in a partial vector (14-, 28-, 56-wide): the row's vectors are loaded with zeros
        # past its end, and a tap's missing neighbour is a zero vector, so the padding lanes of every tap are zeros
        # and no FMA is masked. Ad-hoc interleaved timings on Zen 5, 1 thread, same results to the bit: the
        # depthwise kernel alone clearly faster on 14- and 28-wide planes, the same on 56; the fused expand +
        # depthwise kernels faster on 14 and 28, the same on 56; a little slower on 112-wide rows (whole vectors,
        # only the end vectors change), which keep the masked FMAs. The 85%-sparse MobileNetV2 a little faster
        # in interleaved A/Bs in both orders.
        self.zero_taps = stride == 1 and w % self.vec != 0
        # two rows per vector (`paired`): a 3x3 stride-1 conv, padding 1, on rows of at most half a vector less one
        # lane, so that a zero lane after each row is its right and the next row's left padding
        self.paired = (stride == 1 and k == 3 and (self.top, self.left, bottom, right) == (1, 1, 1, 1)
                       and h >= 2 and w < lanes // 2)

    def tile(self) -> str:
        """The register tile, for kernel names: pixels along a row (whole vectors) x rows per step; paired:
        the vector's lanes and `p2` (two rows in each)."""
        return f"{self.lanes}p2" if self.paired else f"{self.nv * self.vec}x{self.rows}"

    def planes(self, p: Planes) -> None:
        """Emit every output row of the planes p."""
        if self.paired and len(p.inputs) == 1 and len(p.outputs) == 1:
            return self.paired_planes(p)
        s, k, top, rows = self.s, self.k, self.top, self.rows
        inside = [y for y in range(self.oh) if 0 <= s * y - top and s * y + k - 1 - top < self.h]
        y_in0, y_in1 = (inside[0], inside[-1] + 1) if inside else (self.oh, self.oh)
        loop_steps = (y_in1 - y_in0) // rows

        def border(y):
            return lambda t, kh: 0 <= s * (y + t) + kh - top < self.h

        def everywhere(t, kh):
            return True

        for y in range(0, y_in0):
            self.step(p, y, 1, border(y))
        if loop_steps:
            with I.serial(0, loop_steps) as i:
                self.step(p, y_in0 + i * rows, rows, everywhere)
        for y in range(y_in0 + loop_steps * rows, y_in1):
            self.step(p, y, 1, everywhere)
        for y in range(max(y_in0, y_in1), self.oh):
            self.step(p, y, 1, border(y))

    def paired_planes(self, p: Planes) -> None:
        """Every output row of p, two rows to a vector: lanes 0 .. w - 1 hold row y, lanes half .. half + w - 1
        row y + 1, the lanes after each row zero. A pair of input rows is one masked load of their 2w floats and
        a shuffle that spreads them so; the taps are that vector and its shifts by one lane, whose zero lanes
        are the padding (no masked FMA); a pair of output rows is a shuffle and one masked store of 2w floats.
        On 7x7 planes: 4 full-width vectors per plane and tap where rows one at a time take 7 half-width ones."""
        # NOTE: rows are contiguous in src and out (row stride w, as in every CHW plane here), so a pair of rows
        # is one run of 2w floats
        (src, lead), (out, out_lead) = p.inputs[0], p.outputs[0]
        lanes, half, w, h = self.lanes, self.lanes // 2, self.w, self.h
        zero = tirx.Broadcast(tirx.FloatImm(F32, 0.0), lanes)
        pairs: dict = {}

        def pair(r: int):
            """Input rows r and r + 1 spread over the two halves (a row outside the plane: zeros)."""
            if r not in pairs:
                here = [t for t in (r, r + 1) if 0 <= t < h]
                if not here:
                    pairs[r] = zero
                else:
                    n = w * len(here)
                    flat = tirx.call_intrin(f"float32x{lanes}", "tirx.masked_load", src, *lead, here[0],
                                            tirx.Ramp(0, 1, lanes), lanes_inside(0, 1, lanes, n))
                    first = {t: j * w for j, t in enumerate(here)}        # where row t starts in `flat`
                    index = [first[t] + i if t in first and i < w else lanes   # lane `lanes`: a zero
                             for t in (r, r + 1) for i in range(half)]
                    pairs[r] = I.Bind(tirx.Shuffle([flat, zero], index))
            return pairs[r]

        weights = {(kh, kw): I.Bind(tirx.Broadcast(p.weight(0, 0, kh, kw), lanes)) for kh in range(3) for kw in range(3)}
        bias = I.Bind(tirx.Broadcast(p.bias(0), lanes))
        for y in range(0, self.oh, 2):
            sums = []      # NOTE: one sum per input row pair, added last: three short FMA chains, not one long one
            for kh in range(3):
                v = pair(y - 1 + kh)
                if v is zero:
                    continue
                taps = (tirx.Shuffle([zero, v], [lanes - 1 + i for i in range(lanes)]), v,
                        tirx.Shuffle([v, zero], [1 + i for i in range(lanes)]))
                acc = None
                for kw, tap in enumerate(taps):
                    tap = I.Bind(tap)
                    acc = weights[kh, kw] * tap if acc is None else tirx.op.fma(weights[kh, kw], tap, acc)
                sums.append(I.Bind(acc))
            total = bias
            for part in sums:
                total = total + part
            rows = min(2, self.oh - y)
            value = clipped(I.Bind(total), self.clip, lanes)
            packed = tirx.Shuffle([value], [half * (i // w) + i % w if i < rows * w else 0 for i in range(lanes)])
            store(out, packed, [*out_lead, y], 0, rows * w, lanes)

    def step(self, p: Planes, y0, n_rows: int, valid) -> None:
        """Output rows y0 .. y0 + n_rows - 1; valid(t, kh): input row s * (y0 + t) + kh - top exists."""
        s, k, w, vec, nv, ow, left = self.s, self.k, self.w, self.vec, self.nv, self.ow, self.left
        nout = len(p.outputs)
        chunk = max(1, min(nv, ACCUMULATORS // (self.rows * nout)))
        weight = {}
        for v0 in range(0, nv, chunk):
            vs = range(v0, min(nv, v0 + chunk))
            # the step's accumulators: a small stack array that LLVM keeps in registers
            acc = I.alloc_buffer((nout * n_rows * len(vs) * vec,), F32, scope="global")

            def at(o, t, v):
                return [tirx.Ramp(((o * n_rows + t) * len(vs) + v - v0) * vec, 1, vec)]

            for o in range(nout):
                for t in range(n_rows):
                    for v in vs:
                        I.buffer_store(acc, tirx.Broadcast(p.bias(o), vec), at(o, t, v))
            for i, (src, lead) in enumerate(p.inputs):
                for ir in range(s * (n_rows - 1) + k):                 # input row s * y0 + ir - top
                    users = [(t, ir - s * t) for t in range(n_rows) if 0 <= ir - s * t < k and valid(t, ir - s * t)]
                    if not users:
                        continue
                    row = _Row(src, lead, s * y0 + ir - self.top, w, vec, s, self.split, self.zero_taps)
                    for kw in range(k):
                        for v in vs:
                            # input column of each lane; lanes past the row's last output are never stored
                            cols = [s * (v * vec + j) + kw - left for j in range(min(vec, ow - v * vec))]
                            if not any(0 <= col < w for col in cols):
                                continue
                            val = I.Bind(row.tap(v * vec, kw - left))
                            for o in range(nout):
                                for t, kh in users:
                                    if (o, i, kh, kw) not in weight:
                                        weight[o, i, kh, kw] = I.Bind(tirx.Broadcast(p.weight(o, i, kh, kw), vec))
                                    old = tirx.BufferLoad(acc, at(o, t, v))
                                    new = tirx.op.fma(weight[o, i, kh, kw], val, old)
                                    if not all(0 <= col < w for col in cols) and not self.zero_taps:
                                        # a masked FMA: padding adds nothing
                                        new = tirx.Select(lanes_inside(s * v * vec + kw - left, s, vec, w,
                                                                       ow - v * vec), new, old)
                                    I.buffer_store(acc, new, at(o, t, v))
            for o, (out, lead) in enumerate(p.outputs):
                for t in range(n_rows):
                    for v in vs:
                        a = clipped(tirx.BufferLoad(acc, at(o, t, v)), self.clip, vec)
                        store(out, a, [*lead, y0 + t], v * vec, min(vec, ow - v * vec), vec)


def store(buf, value, lead: list, col0: int, n: int, vec: int) -> None:
    """buf[*lead, col0 : col0 + n] = the first n of the vec lanes of `value` (a masked store when n < vec)."""
    if n == vec:
        I.buffer_store(buf, value, [*lead, tirx.Ramp(col0, 1, vec)])
    else:
        I.evaluate(tirx.call_intrin("void", "tirx.masked_store", buf, value, *lead, tirx.Ramp(col0, 1, vec),
                                    tirx.Ramp(0, 1, vec) < tirx.Broadcast(n, vec)))
