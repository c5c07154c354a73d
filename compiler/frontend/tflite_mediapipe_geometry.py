"""MediaPipe's geometry custom ops as Relax: the crop-and-warp ops of its attention face mesh (a transform matrix from
landmarks, a bilinear warp of a feature map by it, landmarks mapped back by it), and its resampler.

Written from the semantics of MediaPipe's CPU kernels (mediapipe/util/tflite/operations/*.cc), each op in its
versions (the op code's version picks one):
- Landmarks2TransformMatrix: landmarks (x, y, z triples, read flat) -> a [1, 4, 4] matrix. v1 rotates by -atan of the
  slope between two landmarks and maps output pixels to input pixels (`itm`); v2 rotates to a target angle and maps an
  output_width x output_height crop around the subset's rotated bounding box.
- TransformTensorBilinear: x [1, H, W, C] sampled at (the matrix's first two rows) . (out_x, out_y, 0, 1), bilinear
  over the four neighbours (zero outside), zero where the point falls off [0, W-1] x [0, H-1]; v2 samples at pixel
  centres (a half-pixel shift on both sides).
- Resampler (TF Addons' resampler): x [B, H, W, C] sampled at the (x, y) of warp [B, H, W, 2] for each output
  pixel, bilinear with zero outside, zero where the point is not inside (-1, W) x (-1, H).
- TransformLandmarks: each landmark's (x, y) replaced by the matrix's first two rows . (x, y, 0, 1) (v1: the
  translation column times `scale`), z kept; v1 landmarks [1, H, W, k * dims], v2 [1, N, dims].
The matrices here are small products of scalars: entries are Python floats where known when compiling, [1] tensors
where they depend on the input, multiplied out with the constants folded.
"""
from __future__ import annotations

from tvm import relax, te, tirx

F32 = "float32"


def _c(v: float) -> relax.Expr:
    return relax.const(v, F32)


def _known(v, value: float | None = None) -> bool:
    """v is a Python float (equal to `value` where given), not a tensor."""
    return isinstance(v, float) and (value is None or v == value)


def _tensor(v) -> relax.Expr:
    return _c(v) if isinstance(v, float) else v


def _mul(a, b):
    if _known(a) and _known(b):
        return a * b
    if _known(a, 0.0) or _known(b, 0.0):     # NOTE: an exact zero of a constant matrix stays an exact zero
        return 0.0
    if _known(a, 1.0) or _known(b, 1.0):
        return b if _known(a, 1.0) else a
    return relax.op.multiply(_tensor(a), _tensor(b))


def _add(a, b):
    if _known(a) and _known(b):
        return a + b
    if _known(a, 0.0) or _known(b, 0.0):
        return b if _known(a, 0.0) else a
    return relax.op.add(_tensor(a), _tensor(b))


def _matmul(a: list[list], b: list[list]) -> list[list]:
    """The product of two small matrices of floats and [1] tensors (row r of a times column c of b, k in order)."""
    out = []
    for r in range(len(a)):
        row = []
        for c in range(len(b[0])):
            acc = 0.0
            for k in range(len(b)):
                acc = _add(acc, _mul(a[r][k], b[k][c]))
            row.append(acc)
        out.append(row)
    return out


def _as_matrix(bb: relax.BlockBuilder, rows: list[list]) -> relax.Expr:
    """A [1, 4, 4] float32 tensor from 16 entries (floats or [1] tensors)."""
    flat = [e if not isinstance(e, float) else relax.const([e], F32) for row in rows for e in row]
    return bb.emit(relax.op.reshape(relax.op.concat(flat, axis=0), [1, 4, 4]))


def _landmark(bb, points: relax.Expr, index: int, axis: int) -> relax.Expr:
    """Coordinate `axis` (0 x, 1 y) of landmark `index` of points [N, 3], as a [1] tensor."""
    one = relax.op.strided_slice(points, axes=[0, 1], begin=[index, axis], end=[index + 1, axis + 1])
    return bb.emit(relax.op.reshape(one, [1]))


def _subset(bb, points: relax.Expr, pairs: list[int]) -> tuple[relax.Expr, relax.Expr]:
    """x and y [K] of the landmarks the subset names: pairs of indices (an odd last one doubled, as MediaPipe
    reads it)."""
    idx = list(pairs) + ([pairs[-1]] if len(pairs) % 2 else [])
    picked = bb.emit(relax.op.take(points, relax.const(idx, "int32"), axis=0, mode="clip"))   # [K, 3]
    return (bb.emit(relax.op.reshape(relax.op.strided_slice(picked, axes=[1], begin=[a], end=[a + 1]), [len(idx)]))
            for a in (0, 1))


def _extent(bb, v: relax.Expr) -> tuple[relax.Expr, relax.Expr]:
    return (bb.emit(relax.op.reshape(relax.op.max(v, axis=0), [1])),
            bb.emit(relax.op.reshape(relax.op.min(v, axis=0), [1])))


def landmarks_to_transform_matrix_v1(bb, landmarks: relax.Expr, count: int, opts: dict) -> relax.Expr:
    """v1 (options input_hw, output_hw, landmarks_range, bbox_size_multiplier, left/right_rotation_idx, subset)."""
    points = bb.emit(relax.op.reshape(landmarks, [count, 3]))
    lx, ly = (_landmark(bb, points, opts["left_rotation_idx"], a) for a in (0, 1))
    rx, ry = (_landmark(bb, points, opts["right_rotation_idx"], a) for a in (0, 1))
    alpha = bb.emit(relax.op.negative(relax.op.atan(relax.op.divide(relax.op.subtract(ry, ly),
                                                                       relax.op.subtract(rx, lx)))))
    ca, sa = bb.emit(relax.op.cos(alpha)), bb.emit(relax.op.sin(alpha))
    px, py = _subset(bb, points, opts["subset"])
    rot_x = bb.emit(relax.op.subtract(relax.op.multiply(px, ca), relax.op.multiply(py, sa)))
    rot_y = bb.emit(relax.op.add(relax.op.multiply(px, sa), relax.op.multiply(py, ca)))
    (max_x, min_x), (max_y, min_y) = _extent(bb, rot_x), _extent(bb, rot_y)
    # MediaPipe starts its running max / min at -1e5 / 1e5
    max_x, max_y = (bb.emit(relax.op.maximum(v, _c(-100000.0))) for v in (max_x, max_y))
    min_x, min_y = (bb.emit(relax.op.minimum(v, _c(100000.0))) for v in (min_x, min_y))
    mult, rng = float(opts["bbox_size_multiplier"]), float(opts["landmarks_range"])
    box_x = bb.emit(relax.op.multiply(relax.op.subtract(max_x, min_x), _c(mult)))
    box_y = bb.emit(relax.op.multiply(relax.op.subtract(max_y, min_y), _c(mult)))
    mid_x = bb.emit(relax.op.divide(relax.op.add(max_x, min_x), _c(2.0)))
    mid_y = bb.emit(relax.op.divide(relax.op.add(max_y, min_y), _c(2.0)))
    cn, sn = ca, bb.emit(relax.op.negative(sa))                         # cos(-alpha), sin(-alpha)
    rmid_x = bb.emit(relax.op.subtract(relax.op.multiply(mid_x, cn), relax.op.multiply(mid_y, sn)))
    rmid_y = bb.emit(relax.op.add(relax.op.multiply(mid_x, sn), relax.op.multiply(mid_y, cn)))
    scale = [[bb.emit(relax.op.divide(box_x, _c(rng))), 0.0, 0.0],
             [0.0, bb.emit(relax.op.divide(box_y, _c(rng))), 0.0], [0.0, 0.0, 1.0]]
    shift_x = bb.emit(relax.op.subtract(relax.op.multiply(relax.op.divide(rmid_x, _c(rng)), _c(2.0)), _c(1.0)))
    shift_y = bb.emit(relax.op.subtract(relax.op.multiply(relax.op.divide(rmid_y, _c(rng)), _c(2.0)), _c(1.0)))
    rotation = [[cn, sa, shift_x], [sn, cn, shift_y], [0.0, 0.0, 1.0]]    # sa = -sin(-alpha)
    (ih, iw), (oh, ow) = opts["input_hw"], opts["output_hw"]
    to_relative = [[2.0 / (ow - 1.0), 0.0, -1.0], [0.0, 2.0 / (oh - 1.0), -1.0], [0.0, 0.0, 1.0]]
    to_absolute = [[(iw - 1.0) / 2.0, 0.0, (iw - 1.0) / 2.0], [0.0, (ih - 1.0) / 2.0, (ih - 1.0) / 2.0],
                   [0.0, 0.0, 1.0]]
    itm = _matmul(_matmul(_matmul(to_absolute, rotation), scale), to_relative)
    return _as_matrix(bb, [[itm[0][0], itm[0][1], 0.0, itm[0][2]], [itm[1][0], itm[1][1], 0.0, itm[1][2]],
                           [itm[2][0], itm[2][1], itm[2][2], 0.0], [0.0, 0.0, 0.0, 1.0]])


def landmarks_to_transform_matrix_v2(bb, landmarks: relax.Expr, count: int, opts: dict) -> relax.Expr:
    """v2 (options left/right_rotation_idx, target_rotation_radians, subset_idxs, output_width / _height,
    scale_x / _y)."""
    points = bb.emit(relax.op.reshape(landmarks, [count, 3]))
    lx, ly = (_landmark(bb, points, opts["left_rotation_idx"], a) for a in (0, 1))
    rx, ry = (_landmark(bb, points, opts["right_rotation_idx"], a) for a in (0, 1))
    angle = relax.op.atan2(relax.op.subtract(ry, ly), relax.op.subtract(rx, lx))
    r = bb.emit(relax.op.subtract(_c(float(opts["target_rotation_radians"])), angle))
    cr, sr = bb.emit(relax.op.cos(r)), bb.emit(relax.op.sin(r))
    px, py = _subset(bb, points, opts["subset_idxs"])
    rot_x = bb.emit(relax.op.subtract(relax.op.multiply(cr, px), relax.op.multiply(sr, py)))
    rot_y = bb.emit(relax.op.add(relax.op.multiply(sr, px), relax.op.multiply(cr, py)))
    (max_x, min_x), (max_y, min_y) = _extent(bb, rot_x), _extent(bb, rot_y)
    width, height = bb.emit(relax.op.subtract(max_x, min_x)), bb.emit(relax.op.subtract(max_y, min_y))
    mid_x = bb.emit(relax.op.divide(relax.op.add(min_x, max_x), _c(2.0)))
    mid_y = bb.emit(relax.op.divide(relax.op.add(min_y, max_y), _c(2.0)))
    ci, si = bb.emit(relax.op.cos(relax.op.negative(r))), bb.emit(relax.op.sin(relax.op.negative(r)))
    crop_x = bb.emit(relax.op.subtract(relax.op.multiply(ci, mid_x), relax.op.multiply(si, mid_y)))
    crop_y = bb.emit(relax.op.add(relax.op.multiply(si, mid_x), relax.op.multiply(ci, mid_y)))
    ow, oh = float(opts["output_width"]), float(opts["output_height"])
    scale_x = bb.emit(relax.op.divide(relax.op.multiply(_c(float(opts["scale_x"])), width), _c(ow)))
    scale_y = bb.emit(relax.op.divide(relax.op.multiply(_c(float(opts["scale_y"])), height), _c(oh)))
    shift = [[1.0, 0.0, 0.0, crop_x], [0.0, 1.0, 0.0, crop_y], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    rotation = [[ci, bb.emit(relax.op.negative(si)), 0.0, 0.0], [si, ci, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0],
                [0.0, 0.0, 0.0, 1.0]]
    scale = [[scale_x, 0.0, 0.0, 0.0], [0.0, scale_y, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    shift2 = [[1.0, 0.0, 0.0, -ow / 2.0], [0.0, 1.0, 0.0, -oh / 2.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    return _as_matrix(bb, _matmul(_matmul(_matmul(shift, rotation), scale), shift2))


def _floor_index(v, size: int):
    """floor(v) as a float and an int32, v clamped to [-1, size] first (outside that the point reads only zeros, and
    a huge float would not cast)."""
    f = tirx.floor(tirx.max(tirx.min(v, float(size)), -1.0))
    return f, f.astype("int32")


def _read_or_zero(data, n, y, x, ch, h: int, w: int):
    """data[n, y, x, ch] of an [N, h, w, C] tensor, 0 where (y, x) is off the map (the index clamped, never read)."""
    ok = tirx.all(y >= 0, x >= 0, y < h, x < w)
    value = data(n, tirx.max(tirx.min(y, h - 1), 0), tirx.max(tirx.min(x, w - 1), 0), ch)
    return tirx.if_then_else(ok, value, tirx.const(0.0, F32))


def transform_tensor_bilinear(bb, x: relax.Expr, matrix: relax.Expr, x_shape: list[int], out_hw: tuple[int, int],
                              version: int) -> relax.Expr:
    """x [1, H, W, C] warped by the matrix's first two rows to [1, OH, OW, C] (module docstring)."""
    _, h, w, c = x_shape
    oh, ow = out_hw
    half = 0.5 if version == 2 else None
    flat = bb.emit(relax.op.reshape(matrix, [16]))

    def warp(data, m):
        def at(n, oy, ox, ch):
            fx, fy = ox.astype(F32), oy.astype(F32)
            x3, y3 = m(3), m(7)
            if half is not None:    # v2: (T (p + 0.5)) - 0.5, folded into the translation as MediaPipe does
                x3 = x3 + (m(0) * half + m(1) * half - half)
                y3 = y3 + (m(4) * half + m(5) * half - half)
            tx = m(0) * fx + m(1) * fy + m(2) * 0.0 + x3
            ty = m(4) * fx + m(5) * fy + m(6) * 0.0 + y3
            inside = tirx.all(tx >= 0.0, tx <= float(w - 1), ty >= 0.0, ty <= float(h - 1))
            (x0, ix), (y0, iy) = _floor_index(tx, w), _floor_index(ty, h)

            def read(yy, xx):
                return _read_or_zero(data, n, yy, xx, ch, h, w)
            right, lower = tx - x0, ty - y0
            upper_v = (1.0 - right) * read(iy, ix) + right * read(iy, ix + 1)
            lower_v = (1.0 - right) * read(iy + 1, ix) + right * read(iy + 1, ix + 1)
            return tirx.if_then_else(inside, lower * lower_v + (1.0 - lower) * upper_v, tirx.const(0.0, F32))
        return te.compute((1, oh, ow, c), at, name="transform_tensor_bilinear")
    return bb.emit_te(warp, x, flat)


def resampler(bb, x: relax.Expr, warp: relax.Expr, shape: list[int]) -> relax.Expr:
    """x [B, H, W, C] sampled at warp [B, H, W, 2] (module docstring), summed in MediaPipe's order."""
    _, h, w, _ = shape

    def sample(data, where):
        def at(n, y, x_, ch):
            wx, wy = where(n, y, x_, 0), where(n, y, x_, 1)
            inside = tirx.all(wx > -1.0, wy > -1.0, wx < float(w), wy < float(h))
            (fx, ix), (fy, iy) = _floor_index(wx, w), _floor_index(wy, h)
            dx, dy = fx + 1.0 - wx, fy + 1.0 - wy

            def read(yy, xx):
                return _read_or_zero(data, n, yy, xx, ch, h, w)
            total = dx * dy * read(iy, ix) + (1.0 - dx) * (1.0 - dy) * read(iy + 1, ix + 1) \
                + dx * (1.0 - dy) * read(iy + 1, ix) + (1.0 - dx) * dy * read(iy, ix + 1)
            return tirx.if_then_else(inside, total, tirx.const(0.0, F32))
        return te.compute(tuple(shape), at, name="resampler")
    return bb.emit_te(sample, x, warp)


def transform_landmarks(bb, landmarks: relax.Expr, matrix: relax.Expr, shape: list[int], dims: int,
                        scale: float) -> relax.Expr:
    """Each (x, y) of landmarks (last axis: groups of `dims` values) mapped by the matrix; z and the shape kept."""
    flat = bb.emit(relax.op.reshape(matrix, [16]))
    m = [bb.emit(relax.op.strided_slice(flat, axes=[0], begin=[i], end=[i + 1])) for i in (0, 1, 3, 4, 5, 7)]
    m0, m1, m3, m4, m5, m7 = m
    if scale != 1.0:
        m3, m7 = (bb.emit(relax.op.multiply(v, _c(scale))) for v in (m3, m7))
    groups = shape[:-1] + [shape[-1] // dims, dims]
    pts = bb.emit(relax.op.reshape(landmarks, groups))
    axis = len(groups) - 1
    px = bb.emit(relax.op.strided_slice(pts, axes=[axis], begin=[0], end=[1]))
    py = bb.emit(relax.op.strided_slice(pts, axes=[axis], begin=[1], end=[2]))
    # (m0, m1, m2, m3) . (x, y, 0, 1), summed left to right as MediaPipe's DotProduct
    nx = relax.op.add(relax.op.add(relax.op.multiply(m0, px), relax.op.multiply(m1, py)), m3)
    ny = relax.op.add(relax.op.add(relax.op.multiply(m4, px), relax.op.multiply(m5, py)), m7)
    parts = [bb.emit(nx), bb.emit(ny)]
    if dims == 3:
        parts.append(bb.emit(relax.op.strided_slice(pts, axes=[axis], begin=[2], end=[3])))
    return bb.emit(relax.op.reshape(relax.op.concat(parts, axis=axis), shape))

