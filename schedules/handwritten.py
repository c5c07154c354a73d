"""The kernels passes emit already scheduled (sparse 1x1, CHW convs), as data that `shrinkc tune` can vary.

A pass builds such a kernel with `build(kind, args, spec)`: `args` are what the kernel computes (shapes,
block, epilogue; JSON values), the knobs only how (pixel tile, rows per step, channels per task). The
kernel carries both (BUILDER_ATTR), so `HandwrittenKernels` rebuilds it with other knobs: the tuner times
those, and ApplySchedules rebuilds it with the knobs a tuning database holds for it. Its task key
(schedules.rule.task_key) hashes the kind and args, never the knobs.
Defaults: the target's `kernel_defaults[kind]`, else the kernel module's own constants.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Callable

from tvm import tirx

from schedules import chw_rows, f32_conv2d_chw, f32_conv2d_dwconv2d_chw, f32_dwconv2d_chw, f32_maxpool2d_chw, \
    f32_spmm_chw, f32_spmm_dwconv2d_chw
from schedules.rule import BUILDER_ATTR, Scheduled, ScheduleRule, recipe

ROW_OPTIONS = (1, 2, 3, 4)          # output rows per step of a depthwise conv (chw_rows.RowConv)
GROUP_OPTIONS = (1, 2, 4, 8)        # channel blocks per task of the fused expand + depthwise kernel
OUT_BLOCK_OPTIONS = (2, 4, 8, 16)   # first-conv channels per task of the fused first conv + depthwise kernel


@dataclass(frozen=True)
class Builder:
    build: Callable[[dict, dict], tirx.PrimFunc]      # (args, knobs) -> the kernel
    defaults: Callable[[dict, object], dict]          # (args, spec) -> knobs
    space: Callable[[dict, object], list]             # (args, spec) -> knob settings worth timing


def _spmm_chw(a: dict, k: dict) -> tirx.PrimFunc:
    return f32_spmm_chw.spmm_chw(
        a["cin"], a["cout"], a["h"], a["w"], a["block"], a["nnzb"], clip=a["clip"], residual=a["residual"],
        pixel_tile=k["pixel_tile"], lanes=a["lanes"], col_dtype=a["col_dtype"],     # named by f32_spmm_chw.kernel_name
        in_plane=a["in_plane"], scale=a.get("scale", False), k_chunk=a.get("k_chunk"), out_plane=a.get("out_plane"),
        res_plane=a.get("res_plane"), clip2=a.get("clip2"), res_channels=a.get("res_channels"),
        tile_tasks=k.get("tile_tasks", False)
    ).with_attr("op_pattern", 8)


def _spmm_chw_defaults(a: dict, spec) -> dict:
    pixels, chunked = a["h"] * a["w"], a.get("k_chunk")
    tile = (f32_spmm_chw.chunked_pixel_tile if chunked else f32_spmm_chw.default_pixel_tile)(
        pixels, a["block"], spec, a["cin"], a["cout"])
    knobs = {"pixel_tile": tile}
    if f32_spmm_chw.default_tile_tasks(a["cin"], a["cout"], pixels, tile, spec, chunked):
        knobs["tile_tasks"] = True    # NOTE: only where set, so other layers' knobs stay those of tuning databases
    return _target("spmm_chw", spec, knobs)


def _spmm_chw_space(a: dict, spec) -> list[dict]:
    lanes, pixels = a["lanes"], a["h"] * a["w"]
    whole = -(-pixels // lanes) * lanes
    tiles = [lanes * v for v in (1, 2, 4, 8, 16) if lanes * v <= max(lanes, whole)
             and lanes * v <= f32_spmm_chw.MAX_PIXEL_TILE]
    # one task per pixel tile: unchunked layers of two or more tiles
    return [{"pixel_tile": t} for t in tiles] + [{"pixel_tile": t, "tile_tasks": True} for t in tiles
                                                 if not a.get("k_chunk") and f32_spmm_chw.tile_count(pixels, t) >= 2]


def _dwconv2d_chw(a: dict, k: dict) -> tirx.PrimFunc:
    return f32_dwconv2d_chw.dwconv2d_chw(a["c"], a["h"], a["w"], a["k"], a["stride"], a["pads"], clip=a["clip"],
                                         lanes=a["lanes"], rows=k["rows"], out_plane=a["out_plane"])


def _spmm_dwconv2d_chw(a: dict, k: dict) -> tirx.PrimFunc:
    blocks = a["c"] // a["block"]
    group = max(g for g in range(1, k["group"] + 1) if blocks % g == 0)   # a default may not divide the blocks
    return f32_spmm_dwconv2d_chw.spmm_dwconv2d_chw(
        a["cin"], a["c"], a["h"], a["w"], a["block"], a["nnzb"], a["k"], a["stride"], a["pads"], clip1=a["clip1"],
        clip=a["clip"], lanes=a["lanes"], col_dtype=a["col_dtype"], out_plane=a["out_plane"],
        in_plane=a["in_plane"], rows=k["rows"], group=group)


def _row_options(a: dict) -> tuple:
    """Rows per depthwise step worth timing: none but the default where the conv goes two rows to a vector
    (chw_rows.RowConv.paired_planes takes no steps)."""
    paired = chw_rows.RowConv(a["h"], a["w"], a["k"], a["stride"], a["pads"], lanes=a["lanes"]).paired
    return (chw_rows.ROWS,) if paired else ROW_OPTIONS


def _fused_space(a: dict, spec) -> list[dict]:
    blocks = a["c"] // a["block"]
    return [{"rows": r, "group": g} for r in _row_options(a) for g in GROUP_OPTIONS if blocks % g == 0]


def _conv2d_dwconv2d_chw(a: dict, k: dict) -> tirx.PrimFunc:
    return f32_conv2d_dwconv2d_chw.conv2d_dwconv2d_chw(
        a["cin"], a["c"], a["h"], a["w"], a["k1"], a["stride1"], a["pads1"], a["k"], a["stride"], a["pads"],
        clip1=a["clip1"], clip=a["clip"], lanes=a["lanes"], out_block=k["out_block"], rows=k["rows"],
        out_plane=a["out_plane"])


def _conv2d_chw(a: dict, k: dict) -> tirx.PrimFunc:
    return f32_conv2d_chw.conv2d_chw(a["cin"], a["c"], a["h"], a["w"], a["k"], a["stride"], a["pads"],
                                     clip=a["clip"], lanes=a["lanes"], out_block=k["out_block"],
                                     out_plane=a["out_plane"])


def _maxpool2d_chw(a: dict, k: dict) -> tirx.PrimFunc:
    return f32_maxpool2d_chw.maxpool2d_chw(a["c"], a["h"], a["w"], a["k"], a["stride"], lanes=a["lanes"])


def _target(kind: str, spec, knobs: dict) -> dict:
    return {**knobs, **spec.kernel_defaults.get(kind, {})}


BUILDERS = {
    "spmm_chw": Builder(_spmm_chw, _spmm_chw_defaults, _spmm_chw_space),
    "dwconv2d_chw": Builder(
        _dwconv2d_chw,
        lambda a, spec: _target("dwconv2d_chw", spec, {"rows": chw_rows.ROWS}),
        lambda a, spec: [{"rows": r} for r in _row_options(a)]),
    "spmm_dwconv2d_chw": Builder(
        _spmm_dwconv2d_chw,
        lambda a, spec: _target("spmm_dwconv2d_chw", spec, {"rows": chw_rows.ROWS, "group": 1}),
        _fused_space),
    "conv2d_dwconv2d_chw": Builder(
        _conv2d_dwconv2d_chw,
        lambda a, spec: _target("conv2d_dwconv2d_chw", spec, {"out_block": f32_conv2d_dwconv2d_chw.OUT_BLOCK,
                                                              "rows": chw_rows.ROWS}),
        lambda a, spec: [{"out_block": b, "rows": r} for b in OUT_BLOCK_OPTIONS if a["c"] % b == 0
                         for r in ROW_OPTIONS]),
    "maxpool2d_chw": Builder(_maxpool2d_chw, lambda a, spec: {}, lambda a, spec: []),     # no knobs
    "conv2d_chw": Builder(
        _conv2d_chw,
        lambda a, spec: _target("conv2d_chw", spec, {"out_block": f32_conv2d_chw.OUT_BLOCK}),
        lambda a, spec: [{"out_block": b} for b in OUT_BLOCK_OPTIONS if a["c"] % b == 0]),
}


def _json(value):
    """args as JSON values (tuples become lists, numpy scalars plain numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else list(v)))


def build(kind: str, args: dict, spec, knobs: dict | None = None) -> tirx.PrimFunc:
    """The kernel `kind` computing `args`, with the target's default knobs (and `knobs` over them)."""
    args = _json(args)
    knobs = {**BUILDERS[kind].defaults(args, spec), **(knobs or {})}
    return _built(json.dumps({"kind": kind, "args": args, "knobs": knobs}, sort_keys=True))


@functools.lru_cache(maxsize=1024)
def _built(recipe_json: str) -> tirx.PrimFunc:
    # NOTE: kernels are immutable IR and a kernel is a function of its recipe alone, so a pass that builds the
    # same one again (every layer's candidates, once per trial of KeepIfFaster's fallbacks) gets it back parsed
    r = json.loads(recipe_json)
    return BUILDERS[r["kind"]].build(r["args"], r["knobs"]).with_attr(BUILDER_ATTR, recipe_json)


def rebuild(r: dict, spec, args: dict | None = None, knobs: dict | None = None) -> tirx.PrimFunc:
    """The kernel of recipe r (rule.recipe of a kernel `build` made) built again, with `args` and `knobs` over
    the recipe's: tuned knobs (ApplySchedules, `shrinkc tune`), or args that change what it reads and writes
    (padded planes, an SE gate: FormCHWRegions, PadChannelPlanes)."""
    return build(r["kind"], {**r["args"], **(args or {})}, spec, {**r["knobs"], **(knobs or {})})


class HandwrittenKernels(ScheduleRule):
    """The rule `shrinkc tune` and ApplySchedules use for kernels `build` made: apply = rebuild with knobs."""

    kind = "handwritten"

    def knob_space(self, func, spec) -> list[dict]:
        r = recipe(func)
        return BUILDERS[r["kind"]].space(r["args"], spec) if r else []

    def apply(self, func, spec, knobs: dict | None = None) -> Scheduled | None:
        r = recipe(func)
        if r is None:
            return None
        knobs = {**r["knobs"], **(knobs or {})}
        new = rebuild(r, spec, knobs=knobs)
        return Scheduled(new, str(new.attrs["global_symbol"]), knobs)


HANDWRITTEN = HandwrittenKernels()
