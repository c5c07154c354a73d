"""`shrinkc analyze`, sparse part: sparsity and block fill of every 1x1 conv, the decision and why, the CHW regions.

The model goes through phases 2 and 3 as `shrinkc compile` runs them (same cost interface, same
`--sparse-min`), and the changelog says what SparsifyConv1x1 and FormCHWRegions did or declined.
"""
from __future__ import annotations

import numpy as np
from tvm import relax

from compiler import pipeline
from passes import changelog
from passes.merge_linear_chains import var_layer_name
from passes.rewriting import channel_vector, op_name, users_of
from passes.sparsify_conv1x1 import SPARSE_MIN, conv1x1_weights
from schedules.f32_spmm_chw import BLOCKS, block_fill

CHW_TAG = "_chw_"   # in the names of the call_tir kernels that read and write CHW (f32_spmm_chw_64x2, ...)


def conv1x1_layers(func: relax.Function) -> list[dict]:
    """Every 1x1 conv SparsifyConv1x1 could take, in order: name (as the changelog names it), shape, weights."""
    users = users_of(func)
    out = []
    for block in func.body.blocks:
        for b in block.bindings:
            w = conv1x1_weights(b.value, any_batch=True)     # batch > 1 too: SparsifyConv1x1 says why it declined
            if w is None:
                continue
            after = users.get(b.var, [])
            bias = after[0].var if len(after) == 1 and after[0] is not None and op_name(after[0].value) == "relax.add" \
                and any(channel_vector(a, w.shape[0]) is not None for a in after[0].value.args) else None
            _, _, h, wd = (int(d) for d in b.value.args[0].ty.shape.values)
            out.append({"layer": var_layer_name(b.var, bias), "w": w, "h": h, "wd": wd})
    return out


def _is_chw(value) -> bool:
    return op_name(value) == "relax.call_tir" and CHW_TAG in value.args[0].name_hint


def chw_regions(func: relax.Function) -> list[dict]:
    """Connected groups of CHW kernels: their bindings (names, kernels), and how many tensors enter and leave
    them from blocked-layout code (each a layout transform at the region border)."""
    chw = {b.var: b.value for block in func.body.blocks for b in block.bindings if _is_chw(b.value)}
    parent = {v: v for v in chw}

    def root(v):
        while parent[v] is not v:
            v = parent[v]
        return v
    inputs_of = {}
    for v, value in chw.items():
        args = [a for a in value.args[1].fields if isinstance(a, relax.Var)]
        inputs_of[v] = args
        for a in args:
            if a in chw:
                parent[root(a)] = root(v)
    users = users_of(func)
    regions: dict = {}
    for v in chw:   # insertion order = program order
        r = regions.setdefault(root(v), {"layers": [], "kernels": [], "enter": set(), "leave": 0})
        r["layers"].append(v.name)
        r["kernels"].append(chw[v].args[0].name_hint)
        r["enter"] |= {a for a in inputs_of[v] if a not in chw}
        r["leave"] += any(u is None or u.var not in chw for u in users.get(v, []))
    return [{**r, "enter": len(r["enter"])} for r in regions.values()]


def _families(kernels: list[str]) -> str:
    """f32_spmm_chw_64x2_3, f32_dwconv3x3s1_chw_4, f32_spmm1x1_dwconv3x3s2_chw_64x2 ...
    -> 'spmm_chw x2, dwconv3x3s1_chw x1, spmm1x1_dwconv3x3s2 x1'."""
    counts: dict[str, int] = {}
    for k in kernels:
        fam = "_".join(k.split("_")[1:3])
        counts[fam] = counts.get(fam, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in counts.items())


def sparse_sections(mod, spec, cost=None, sparse_min: float = SPARSE_MIN) -> list[tuple[str, list[str], list[list]]]:
    """[(title, columns, rows)] for the 1x1 convs and for the CHW regions."""
    steps = dict(pipeline.phases(spec, pipeline.Options(sparse_min=sparse_min, cost=cost)))
    with changelog.collecting() as book, spec.tvm_target():
        for p in steps["shrink"]:
            mod = p(mod)
        convs = conv1x1_layers(mod["main"])
        after = mod
        for p in steps["sparse"]:
            after = p(after)
    summary = book.summary()
    done = {c["layer"]: c for c in summary.get("SparsifyConv1x1", {}).get("changes", [])}
    why_not = {k["layer"]: k["why"] for k in summary.get("SparsifyConv1x1", {}).get("skipped", [])}
    rows = []
    for c in convs:
        w = c["w"]
        fills = " ".join(f"{b}x1:{block_fill(w, b):.2f}" for b in BLOCKS[::-1] if w.shape[0] % b == 0)
        zeros = 1.0 - np.count_nonzero(w) / w.size
        d = done.get(c["layer"])
        if d is not None:
            up = f", {d['speedup']}x faster than dense (measured)" if d["speedup"] is not None else \
                " (not measured: the zero share decided)"
            decision, why = "sparse", f"{d['block']}x1 blocks, {d['kernel']}{up}"
        else:
            decision, why = "dense", why_not.get(c["layer"], "sparse phase off for this target")
        rows.append([c["layer"], f"{w.shape[1]}->{w.shape[0]} @ {c['h']}x{c['wd']}", f"{zeros:.0%}", fills,
                     decision, why])
    sections = [("sparse 1x1 convs (SparsifyConv1x1)", ["layer", "cin->cout @ HxW", "zeros", "block fill",
                                                         "decision", "why"], rows)]
    kept = summary.get("SparseRegions", {})
    regions = chw_regions(after["main"])
    rrows = [[f"region {i}", f"{r['layers'][0]} .. {r['layers'][-1]}",
              str(sum(k.startswith("f32_spmm") for k in r["kernels"])),
              str(sum("dwconv" in k for k in r["kernels"])), str(r["enter"]), str(r["leave"]),
              _families(r["kernels"])]
             for i, r in enumerate(regions)]
    if not regions:
        why = (kept.get("skipped") or [{"why": "no layer went sparse"}])[0]["why"]
        rrows = [["none", "", "", "", "", "", why]]
    elif kept.get("changes"):
        c = kept["changes"][0]
        part = f" ({c['part']} alone; the whole region {c['whole_ms']} ms)" if c.get("part") else ""
        rrows.append(["whole model", "", "", "", "", "", f"{c['before_ms']} ms without -> {c['after_ms']} ms with the "
                                                         f"regions ({c['speedup']}x): kept{part}"])
    sections.append(("CHW regions (FormCHWRegions)", ["region", "from .. to", "sparse 1x1", "depthwise",
                                                      "tensors in", "tensors out", "kernels"], rrows))
    return sections
