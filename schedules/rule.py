"""What a schedule rule is, and the steps CPU rules share: find the kernel block, fuse epilogues, pick tiles."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import tvm_ffi
from tvm import relax, s_tir, tirx

KERNEL_ATTR = "shrinkc.kernel"
SCHEDULED_ATTR = "shrinkc.scheduled"  # on a PrimFunc that is final: no rule schedules it again
BUILDER_ATTR = "shrinkc.builder"      # on a kernel a pass built scheduled: how to rebuild it (schedules/handwritten.py)


def static_shape(expr) -> list[int] | None:
    """A Relax tensor's shape where every dimension is a number, else None (legalization and passes/ both ask)."""
    shape = getattr(expr.ty, "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or not all(isinstance(d, tirx.IntImm) for d in shape.values):
        return None
    return [int(d) for d in shape.values]


@dataclass
class Scheduled:
    """A scheduled PrimFunc, the kernel name it deserves (dtype_op_layout_tile) and its knobs."""

    func: tirx.PrimFunc
    name: str
    knobs: dict = field(default_factory=dict)


class ScheduleRule:
    """A family of kernels. `apply` returns Scheduled, or None when the function is not its kind."""

    kind = ""  # the `shrinkc.kernel` block annotation this rule schedules ("" = decides by itself)

    def default_knobs(self, info: dict, spec) -> dict:
        return {}

    def knob_space(self, func: tirx.PrimFunc, spec) -> list[dict]:
        """The knob settings worth timing for `func` (empty: nothing to tune, or not this rule's kind)."""
        return []

    def apply(self, func: tirx.PrimFunc, spec, knobs: dict | None = None) -> Scheduled | None:
        raise NotImplementedError

    def kernel(self, func: tirx.PrimFunc):
        """(a schedule of func, its block of this rule's kind, the block's annotations), or None without one."""
        sch = s_tir.Schedule(func)
        block, ann = kernel_block(sch, self.kind)
        return None if block is None else (sch, block, ann)


def task_key(func: tirx.PrimFunc) -> str:
    """A key of an unscheduled PrimFunc that is the same in every process: its structural hash.

    Tuning records and ApplySchedules meet on it (function names change with the model around them). A kernel
    a pass built (BUILDER_ATTR) is keyed by what it computes, not by the knobs it was built with."""
    built = recipe(func)
    if built is not None:
        text = json.dumps({"kind": built["kind"], "args": built["args"]}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"{tvm_ffi.structural_hash(func) & (2**64 - 1):016x}"


def recipe(func) -> dict | None:
    """{"kind", "args", "knobs"} of a kernel schedules/handwritten.py built (BUILDER_ATTR), or None."""
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None or BUILDER_ATTR not in func.attrs:
        return None
    return json.loads(str(func.attrs[BUILDER_ATTR]))


def is_scheduled(func) -> bool:
    """True for a PrimFunc that arrives scheduled (ApplySchedules' output, a pass's hand-written kernel)."""
    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and SCHEDULED_ATTR in func.attrs


def is_library_call(func) -> bool:
    """A PrimFunc whose one block calls a runtime library routine (te.extern: topi's CPU topk / sort / argsort):
    no loop nest, nothing to schedule. Its block is not the usual "root". Or one with a step written imperatively
    (topi's vision kernels: non-maximum suppression, searchsorted, argsort calls): a block with no iteration
    variables and no declared reads or writes. Nothing there for a schedule to move, and inlining a producer into
    such a function loses the buffer its loops write in place (SSD's all_class_non_max_suppression failed to build:
    "T_gather is used before its definition")."""
    body = func.body
    if isinstance(body, s_tir.stmt.SBlockRealize) and body.block.name_hint != "root":
        return True
    try:
        sch = s_tir.Schedule(func)
        blocks = [sch.get(rv) for rv in sch.get_child_blocks(_root(sch))]
    except Exception:   # NOTE: not a function of sblocks (a hand-written kernel): not a library call
        return False
    return any(not b.iter_vars and not b.reads and not b.writes for b in blocks)


def kernel_block(sch: s_tir.Schedule, kind: str):
    """The block annotated `shrinkc.kernel == kind`, with its annotations, or (None, None)."""
    for block_rv in sch.get_child_blocks(_root(sch)):
        block = sch.get(block_rv)
        ann = block.annotations
        if KERNEL_ATTR in ann and str(ann[KERNEL_ATTR]) == kind:
            return block_rv, {k: _py(v) for k, v in ann.items()}
    return None, None


def kernel_extents(func: tirx.PrimFunc, kind: str) -> tuple[list[int], dict] | None:
    """(loop extents, annotations) of the `kind` kernel block of `func`, or None when it has none."""
    sch = s_tir.Schedule(func)
    block, ann = kernel_block(sch, kind)
    if block is None:
        return None
    return [int(sch.get(lp).extent) for lp in sch.get_loops(block)], ann


def _root(sch: s_tir.Schedule):
    return sch.get_sblock("root")


def _py(v):
    if isinstance(v, str):
        return str(v)
    if isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, (tirx.IntImm,)):
        return int(v)
    if hasattr(v, "value") and isinstance(getattr(v, "value"), (int, float, str)):
        return v.value
    try:
        return [int(x) for x in v]
    except TypeError:
        return str(v)


def top_blocks(sch: s_tir.Schedule) -> list:
    return list(sch.get_child_blocks(_root(sch)))


def inline_producers(sch: s_tir.Schedule, block) -> None:
    """compute_inline every injective producer of `block` (padding, layout shuffles) into it."""
    for p in sch.get_producers(block):
        try:
            sch.compute_inline(p)
        except Exception:  # a producer that cannot be inlined stays a loop nest of its own
            pass


def writes_output(sch: s_tir.Schedule, block) -> bool:
    """Whether the block writes one of the function's parameters (its outputs)."""
    params = list(sch.mod["main"].params)
    return any(any(region.source.same_as(p) for p in params) for region in sch.get(block).writes)


def _same_shape_out(sch: s_tir.Schedule, a, b) -> bool:
    shapes = [[int(d) for d in sch.get(x).writes[0].source.shape] for x in (a, b)]
    return shapes[0] == shapes[1]


def inline_epilogue(sch: s_tir.Schedule, block, tile_loop=None) -> list:
    """Fuse the elementwise consumers of `block` (bias, activation, residual add) into it.

    Intermediate elementwise blocks are inlined into their readers first (so x * relu6(x + 3)
    becomes one block), except into a reader that broadcasts them over a larger output (a
    squeeze-and-excitation gate, sigmoid(conv + bias) on [1, C, 1, 1], times the feature map: inlined there,
    the sigmoid would run once per pixel instead of once per channel); so are the blocks of another input's
    chain into the epilogue, neither before nor after `block` (a quantized model's gated map, quantize steps
    on it: left alone they were serial loop nests through buffers of their own); then what is left is inlined
    into `block`; a consumer that cannot be (it reads the tile more than once, say) is computed inside
    `tile_loop`, still in cache. Returns the consumers that stay loop nests of their own."""
    for blk in list(top_blocks(sch)):
        if sch.get(blk).same_as(sch.get(block)) or writes_output(sch, blk):
            continue
        upstream = block_is_after(sch, block, blk)   # a producer of `block` (a pad): the caller's to place
        if not upstream and not _broadcast_by_reader(sch, blk):
            try:
                sch.compute_inline(blk)
            except Exception:
                pass
    left = []
    todo = list(sch.get_consumers(block))
    seen = {sch.get(c).name_hint for c in todo}
    while todo:
        c = todo.pop(0)
        try:
            sch.reverse_compute_inline(c)
            # its readers now read `block`
            fresh = [x for x in sch.get_consumers(block) if sch.get(x).name_hint not in seen]
            seen.update(sch.get(x).name_hint for x in fresh)
            todo += fresh
        except Exception:
            if tile_loop is None or not _same_shape_out(sch, c, block):
                # NOTE: computed at the tile, a consumer that writes more than the tile (a pad appending
                # channels) would leave the rest of its output unwritten
                left.append(c)
                continue
            try:
                sch.reverse_compute_at(c, tile_loop)
                sch.vectorize(sch.get_loops(c)[-1])
            except Exception:
                left.append(c)
    return left


def _broadcast_by_reader(sch: s_tir.Schedule, blk) -> bool:
    """Whether a reader of `blk` writes more elements than `blk` does (reads it broadcast)."""
    size = math.prod(int(d) for d in sch.get(blk).writes[0].source.shape)
    return any(math.prod(int(d) for d in sch.get(c).writes[0].source.shape) > size
               for c in sch.get_consumers(blk))


def block_is_after(sch: s_tir.Schedule, blk, block) -> bool:
    """Whether `blk` depends (transitively) on `block`."""
    frontier, seen = list(sch.get_consumers(block)), set()
    while frontier:
        b = frontier.pop()
        key = sch.get(b).name_hint
        if key in seen:
            continue
        seen.add(key)
        if sch.get(b).same_as(sch.get(blk)):
            return True
        frontier.extend(sch.get_consumers(b))
    return False


def tile_in_registers(sch: s_tir.Schedule, block, at_loop):
    """Accumulate `block`'s tile in a small buffer written back (with the fused epilogue) at `at_loop`.

    NOTE: `global` scope, not `local`: see passes/keep_tiles_on_stack.py. Returns (write-back block,
    consumers left as their own loop nests)."""
    wb = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(wb, at_loop)
    return wb, inline_epilogue(sch, wb, at_loop)


def finish_tile(sch: s_tir.Schedule, block, wb, first_reduce_loop, left: list, lanes: int) -> None:
    """Vectorise the write-back's own innermost loop, split off the zero-init, schedule leftovers.

    NOTE: decompose_reduction must come after every vectorize/parallel on the block."""
    inner = sch.get_loops(wb)[-1]
    shared = any(sch.get(inner).same_as(sch.get(lp)) for lp in sch.get_loops(block))
    if not shared:   # a write-back with no loop of its own (one value per task) is not vectorised
        sch.vectorize(inner)
    sch.decompose_reduction(block, first_reduce_loop)
    for c in left:
        schedule_injective(sch, c, lanes)


def best_divisor(extent: int, target: int, low: int = 1) -> int:
    """The divisor of `extent` nearest to `target` (not above it when possible), at least `low`."""
    divs = [d for d in range(1, extent + 1) if extent % d == 0]
    below = [d for d in divs if low <= d <= target]
    if below:
        return max(below)
    return min(divs, key=lambda d: abs(d - target))


MIN_PARALLEL = 4096   # elements below which an elementwise nest runs on one thread


def schedule_injective(sch: s_tir.Schedule, block, lanes: int, min_parallel: int = MIN_PARALLEL) -> None:
    """Fuse the loops of an elementwise block, vectorise the innermost run, parallelise the rest."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [int(sch.get(lp).extent) for lp in loops]
    total = 1
    for e in extents:
        total *= e
    if len(loops) > 1 and extents[-1] % lanes == 0:
        # the innermost loop split into whole vectors, the others fused: a vector's lanes differ in the innermost
        # index only (across one fused loop the index arithmetic was left per lane: gathers and scatters)
        fused = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        sch.vectorize(loops[-1] if extents[-1] == lanes else sch.split(loops[-1], [None, lanes])[1])
    else:
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        if extents[-1] % lanes == 0:      # one loop of whole vectors
            fused, vi = sch.split(fused, [None, lanes])
            sch.vectorize(vi)
    if total >= min_parallel:
        sch.parallel(fused)
