"""Everything without a kernel of its own: elementwise loop nests vectorised and parallelised,
reductions parallel over their outputs. Always applies; it is the last rule.

An elementwise nest walks its output in memory order (its loops reordered by the stride each has in the
written buffer), so a layout transform or transpose writes whole vectors and gathers its reads, instead
of reading in order and scattering every lane to another plane (a blocked -> NCHW transform at a CHW
region's border ran several times slower that way).

Blocks that only move data into a buffer of the function's own (the slices, concat, reshapes and transpose
of a fused channel shuffle, a pad before a pool) are inlined into their readers first, so such a chain is one
pass over memory instead of one per op; what is left is copied row by row (copy_rows), the choice between
sources made once per row (selects_to_branches). A torch.onnx ShuffleNetV2's shuffles ran many times faster so
than as one materialised intermediate per op (ad-hoc single-kernel timings).
"""
from __future__ import annotations

import math

import tvm
from tvm import s_tir, sym, tirx

from schedules.rule import MIN_PARALLEL, Scheduled, ScheduleRule, schedule_injective, top_blocks, writes_output

IF_THEN_ELSE = tvm.ir.Op.get("prim.if_then_else")


class Fallback(ScheduleRule):
    """Vectorise and parallelise whatever loop nests a function has."""

    def apply(self, func, spec, knobs=None):
        sch = s_tir.Schedule(func)
        inline_data_movement(sch)
        inline_arithmetic(sch)
        for block in top_blocks(sch):
            iters = sch.get(block).iter_vars
            try:
                if whole_reduction(sch, block, spec.vector_lanes) or lane_reduction(sch, block, spec.vector_lanes):
                    continue
                if all(int(iv.iter_type) == 0 for iv in iters):  # all data-parallel
                    if not in_write_order(sch, block, spec.vector_lanes) \
                            and not copy_rows(sch, block, spec.vector_lanes):
                        schedule_injective(sch, block, spec.vector_lanes)
                else:
                    loops = sch.get_loops(block)
                    spatial = [lp for lp, iv in zip(loops, iters) if int(iv.iter_type) == 0]
                    if spatial and spatial == loops[:len(spatial)] \
                            and not lanes_inside_reduction(sch, block, len(spatial), spec.vector_lanes):
                        sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
            except Exception:  # leave a nest we cannot transform as it is: correct, just slower
                continue
        func = sch.mod["main"]
        return Scheduled(func.with_body(selects_to_branches(func.body)), "", {})


def picked_loads(value) -> list | None:
    """The loads a stored value picks from where it only picks elements (loads, constants, casts and selects
    between them), else None."""
    if isinstance(value, tvm.ir.TensorLoad):
        return [value]
    if isinstance(value, (tirx.IntImm, tirx.FloatImm)):
        return []
    if isinstance(value, tirx.Cast):
        return picked_loads(value.value)
    if isinstance(value, tirx.Select):
        options = (value.true_value, value.false_value)
    elif isinstance(value, tvm.ir.Call) and value.op.same_as(IF_THEN_ELSE):
        options = (value.args[1], value.args[2])
    else:
        return None
    a, b = (picked_loads(v) for v in options)
    return None if a is None or b is None else a + b


def moves_data(value) -> bool:
    return picked_loads(value) is not None


def inline_data_movement(sch: s_tir.Schedule) -> None:
    """compute_inline every block that writes one of the function's own buffers and only moves data
    (moves_data): its readers then read the source directly. Cheap to recompute, so inlined even where a
    reader reads an element more than once (a pool over a padded input)."""
    for block in top_blocks(sch):
        b = sch.get(block)
        if len(b.writes) != 1 or writes_output(sch, block):
            continue
        if not isinstance(b.body, tirx.BufferStore) or not moves_data(b.body.value):
            continue
        try:
            sch.compute_inline(block)
        except Exception:  # a block that cannot be inlined stays a loop nest of its own
            continue


CHEAP_CALLS = {"tirx.nearbyint", "tirx.round", "tirx.floor", "tirx.ceil", "tirx.trunc", "tirx.fabs"}


def op_names(value) -> set[str]:
    """The names of the calls in an expression (if_then_else, exp, nearbyint, ...)."""
    if isinstance(value, tvm.ir.Call):
        return {str(value.op.name)}.union(*(op_names(a) for a in value.args))
    parts = [getattr(value, f, None) for f in ("a", "b", "value", "condition", "true_value", "false_value")]
    return set().union(*(op_names(p) for p in parts if isinstance(p, tvm.ir.Expr)))


def inline_arithmetic(sch: s_tir.Schedule) -> None:
    """compute_inline every elementwise block of the function's own buffers whose value is plain arithmetic
    (no call but rounding), so a chain of them is one pass over memory. A fused quantize step (divide,
    round, add, clip, subtract around a scale and zero point computed in 0-d blocks) ran as one loop nest and
    one intermediate per op. Blocks with other calls (exp, sigmoid) are left, as a per-channel value a reader
    broadcasts would be recomputed for every pixel."""
    for block in top_blocks(sch):
        b = sch.get(block)
        if len(b.writes) != 1 or writes_output(sch, block) or any(int(iv.iter_type) != 0 for iv in b.iter_vars):
            continue
        if not isinstance(b.body, tirx.BufferStore) or not op_names(b.body.value) <= CHEAP_CALLS:
            continue
        try:
            sch.compute_inline(block)
        except Exception:  # a block that cannot be inlined stays a loop nest of its own
            continue


def whole_reduction(sch: s_tir.Schedule, block, lanes: int) -> bool:
    """A reduction of a whole tensor to one value (max / min / sum of every element) whose innermost axis is a
    whole number of vectors (a channel-blocked tensor): one partial result per position along that axis
    (rfactor), the tensor walked once in order a vector at a time, the partials reduced at the end; True
    when scheduled. (A plain nest is one scalar dependency chain over the tensor; fusing all axes first left
    index arithmetic per lane, and LLVM loaded element by element.)"""
    b = sch.get(block)
    if len(b.writes) != 1 or len(b.writes[0].source.shape) != 0 or not b.iter_vars \
            or any(int(iv.iter_type) != 2 for iv in b.iter_vars):
        return False
    loops = sch.get_loops(block)
    if len(loops) < 2 or int(sch.get(loops[-1]).extent) % lanes:
        return False
    if len(loops) > 2:
        sch.fuse(*loops[:-1])
    partial = sch.rfactor(sch.get_loops(block)[-1], 0)     # partial[j]: the innermost axis kept, the rest reduced
    sch.vectorize(sch.get_loops(partial)[-1])
    init = sch.decompose_reduction(partial, sch.get_loops(partial)[0])
    sch.vectorize(sch.get_loops(init)[-1])
    return True


def lane_reduction(sch: s_tir.Schedule, block, lanes: int) -> bool:
    """A reduction over a channel-blocked tensor's channels per pixel (a LayerNorm's mean of NCHW{b}c: over the
    blocks and, innermost, their b lanes, read contiguously): b partial results per pixel, each block added as
    one vector, then the b lanes added (rfactor); the pixels fused and parallel; True when scheduled. (A plain
    nest was one scalar dependency chain of C adds per pixel.)"""
    b = sch.get(block)
    kinds = [int(iv.iter_type) for iv in b.iter_vars]
    loops = sch.get_loops(block)
    spatial = kinds.count(0)
    if len(b.writes) != 1 or len(b.reads) != 1 or len(loops) != len(kinds) or not spatial \
            or kinds != [0] * spatial + [2] * (len(kinds) - spatial) or len(kinds) == spatial \
            or int(sch.get(loops[-1]).extent) % lanes:
        return False
    last = b.reads[0].region[-1].min
    if not (isinstance(last, tirx.Var) and last.same_as(b.iter_vars[-1].var)):
        return False            # the innermost reduce loop is not the read buffer's innermost (contiguous) axis
    pixels = sch.fuse(*loops[:spatial]) if spatial > 1 else loops[0]
    partial = sch.rfactor(sch.get_loops(block)[-1], len(b.writes[0].source.shape))
    sch.compute_at(partial, pixels)        # the b partial sums of one pixel at a time
    sch.parallel(pixels)
    lane, *over = sch.get_loops(partial)[1:]
    sch.reorder(*over, lane)
    sch.vectorize(lane)
    init = sch.decompose_reduction(partial, over[0])
    sch.vectorize(sch.get_loops(init)[-1])
    return True


def copy_rows(sch: s_tir.Schedule, block, lanes: int) -> bool:
    """An elementwise nest that only moves data and reads and writes along its innermost loop contiguously
    (a slice, concat or channel permutation of NCHW planes): the innermost loops along which every buffer
    stays contiguous (none of the two outermost where it has three or more) fused into one inner loop, a plain
    copy, vectorised where it fills whole vectors (else left to LLVM), the outer ones fused and parallel;
    True when scheduled."""
    loops = sch.get_loops(block)
    if len(loops) < 2:
        return False
    strides, reads = write_strides(sch, block), read_strides(sch, block)   # reads: None unless it moves data
    if strides is None or reads is None or any(r[-1] != 1 for r in [strides, *reads]):
        return False
    extents = [int(sch.get(lp).extent) for lp in loops]
    k, span = len(loops) - 1, extents[-1]
    while k > 0 and all(r[k - 1] == span for r in [strides, *reads]):
        k -= 1
        span *= extents[k]
    k = max(k, min(2, len(loops) - 1))
    inner = sch.fuse(*loops[k:]) if len(loops) - k > 1 else loops[k]
    outer = sch.fuse(*loops[:k]) if k > 1 else loops[0]
    if math.prod(extents[k:]) % lanes == 0:
        _, vec = sch.split(inner, [None, lanes])
        sch.vectorize(vec)
    if math.prod(extents) >= MIN_PARALLEL:
        sch.parallel(outer)
    return True


def selects_to_branches(stmt):
    """Each data-moving store of a choice between sources (`out = if_then_else(c, a, b)`, a concat) as a branch
    between two stores: where c does not change along the inner loop, lowering hoists the branch out of it
    (HoistIfThenElse) and the loop is a plain copy."""
    if isinstance(stmt, tirx.For):
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, selects_to_branches(stmt.body),
                        stmt.thread_binding, stmt.annotations)
    if isinstance(stmt, tirx.SeqStmt):
        return tirx.SeqStmt([selects_to_branches(s) for s in stmt.seq])
    if isinstance(stmt, s_tir.SBlockRealize):
        return s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, selects_to_branches(stmt.block))
    if isinstance(stmt, s_tir.SBlock):
        body = stmt.body
        if stmt.init is None and isinstance(body, tirx.BufferStore) and moves_data(body.value):
            body = _branch(body)
        elif not isinstance(body, tirx.BufferStore):
            body = selects_to_branches(body)
        return s_tir.SBlock(stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint, body, stmt.init,
                            stmt.alloc_buffers, stmt.match_buffers, stmt.annotations)
    return stmt


def _branch(store):
    v = store.value
    if isinstance(v, tvm.ir.Call) and v.op.same_as(IF_THEN_ELSE):
        return tirx.IfThenElse(v.args[0], _branch(tirx.BufferStore(store.buffer, v.args[1], store.indices)),
                               _branch(tirx.BufferStore(store.buffer, v.args[2], store.indices)))
    return store


def loop_vars(sch: s_tir.Schedule, block) -> list | None:
    """The block variable each loop of a perfect nest binds (one each), or None."""
    loops = sch.get_loops(block)
    realize = sch.get(loops[-1]).body if loops else None
    if not isinstance(realize, s_tir.SBlockRealize):
        return None
    lvars = [sch.get(lp).loop_var for lp in loops]
    bound = {}
    for iv, value in zip(sch.get(block).iter_vars, realize.iter_values):
        for i, lv in enumerate(lvars):
            if isinstance(value, tirx.Var) and value.same_as(lv):
                bound[i] = iv.var
    return [bound[i] for i in range(len(loops))] if len(bound) == len(loops) else None


def _strides(flat, bvars, analyzer=None) -> list[int | None]:
    """Each variable's stride in a flat index, None where the index is not linear in it."""
    if analyzer is not None:
        flat = analyzer.simplify(flat)
    strides = []
    for v in bvars:
        coef = sym.detect_linear_equation(flat, [v])
        strides.append(int(coef[0]) if len(coef) == 2 and isinstance(coef[0], tirx.IntImm) else None)
    return strides


def _flat(indices, shape):
    flat = None
    for i, dim in zip(indices, shape):
        flat = i if flat is None else flat * dim + i
    return flat


def write_strides(sch: s_tir.Schedule, block) -> list[int] | None:
    """For each loop of a perfect nest whose loops each bind one block variable: that variable's stride in
    the block's (single) written buffer; None where that is not known."""
    b = sch.get(block)
    bvars = loop_vars(sch, block)
    if len(b.writes) != 1 or bvars is None:
        return None
    region, buf = b.writes[0].region, b.writes[0].source
    strides = _strides(_flat([r.min for r in region], buf.shape), bvars)
    return None if None in strides else strides


def read_strides(sch: s_tir.Schedule, block) -> list[list[int | None]] | None:
    """For a data-moving block (moves_data): per load of its value, each loop's stride in the buffer it reads
    (the index simplified over the block variables' ranges, so a reshape's div / mod of a row index that
    cannot leave the row drops out), None for a loop it is not linear in (a channel shuffle's channel); None
    for a block that does more than move data."""
    b = sch.get(block)
    bvars = loop_vars(sch, block)
    if bvars is None or not isinstance(b.body, tirx.BufferStore):
        return None
    loads = picked_loads(b.body.value)
    if loads is None:
        return None
    analyzer = sym.Analyzer()
    for iv in b.iter_vars:
        analyzer.bind(iv.var, iv.dom)
    return [_strides(_flat(ld.indices, ld.source.shape), bvars, analyzer) for ld in loads]


def in_write_order(sch: s_tir.Schedule, block, lanes: int) -> bool:
    """Reorder an elementwise nest by write_strides, largest first (leave it where they are not known).
    Where that changed the order and the innermost loop fills whole vectors, schedule it too: the
    innermost loop vectorised, the others fused and parallel (no index arithmetic across a fused
    innermost loop); True when scheduled."""
    loops = sch.get_loops(block)
    strides = write_strides(sch, block)
    if strides is None or len(loops) < 2:
        return False
    order = sorted(range(len(loops)), key=lambda i: -strides[i])
    if order == list(range(len(loops))):
        return False
    loops = [loops[i] for i in order]
    sch.reorder(*loops)
    if int(sch.get(loops[-1]).extent) % lanes:
        return False
    outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    _, vec = sch.split(loops[-1], [None, lanes])
    sch.vectorize(vec)
    if math.prod(int(sch.get(lp).extent) for lp in sch.get_loops(block)) >= MIN_PARALLEL:
        sch.parallel(outer)
    return True


def lanes_inside_reduction(sch: s_tir.Schedule, block, n_spatial: int, lanes: int) -> bool:
    """A reduction whose innermost output axis is contiguous and one vector wide (a pool over a channel-blocked
    tensor): that axis moved inside the reduction loops and vectorised, the other output axes fused and
    parallel, the initial value split off; True when scheduled."""
    loops = sch.get_loops(block)
    strides = write_strides(sch, block)
    if strides is None or n_spatial < 2 or strides[n_spatial - 1] != 1 \
            or int(sch.get(loops[n_spatial - 1]).extent) != lanes:
        return False
    spatial, reduce = loops[:n_spatial], loops[n_spatial:]
    sch.reorder(*spatial[:-1], *reduce, spatial[-1])
    sch.parallel(sch.fuse(*spatial[:-1]) if n_spatial > 2 else spatial[0])
    sch.vectorize(spatial[-1])
    init = sch.decompose_reduction(block, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
    return True
