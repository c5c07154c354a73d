"""`shrinkc analyze`: per inverted residual block, how linear it is, what merging it would cost, and the decision;
then the sparse sections (compiler/analyze_sparse.py): every 1x1 conv's sparsity, block fill and decision, and
the CHW regions.

`analyze()` returns a report of sections (title, columns, rows); `render()` prints it. Other
analyses add a section with `add_section`.
"""
from __future__ import annotations

import targets
from compiler import pipeline
from passes import changelog
from passes.merge_linear_chains import MergeLinearChains
from passes.prune_activations import PruneActivations, find_blocks


def add_section(report: dict, title: str, columns: list[str], rows: list[list]) -> None:
    report.setdefault("sections", []).append({"title": title, "columns": columns, "rows": rows})


def cleaned(model, spec, pins=None):
    """The model imported and through phase 1 (what phase 2 sees)."""
    from compiler.driver import import_model
    mod, info = import_model(model, pins)
    with spec.tvm_target():
        for p in dict(pipeline.phases(spec, pipeline.Options(shrink="off")))["cleanup"]:
            mod = p(mod)
    return mod, info


def depth_section(mod, spec, calib: dict | None, cost=None, final_activation: bool = False
                  ) -> tuple[list[str], list[list]]:
    """One row per block: activations, non-linear share, agreement alone, chain/merged ms, decision, why
    (with final_activation: as if each block whose activations go got a ReLU6 after it)."""
    blocks = find_blocks(mod["main"])
    stats = {}
    if calib:
        from compiler.shrink_auto import block_stats
        stats = {s.name: s for s in block_stats(mod, calib, final_activation)[0]}
    if cost is None:
        from compiler.cost import Cost
        cost = Cost(spec)
    with changelog.collecting() as book:   # as if every block's activations were gone
        with spec.tvm_target():
            MergeLinearChains(cost, select=True)(PruneActivations([b.name for b in blocks if b.acts],
                                                                  final_activation)(mod))
    entry = book.summary().get("MergeLinearChains", {})
    rows = []
    for b in blocks:
        s = stats.get(b.name)
        merged = [c for c in entry.get("changes", []) if set(b.layers) & set(c["layers"])]
        skipped = [k for k in entry.get("skipped", []) if set(b.layers) & set(k["layer"].split("+"))]
        if merged:
            c = merged[0]
            decision = "merge" if not b.acts else "merge if activations removed"
            why = f"{'+'.join(c['layers'])} -> conv {'x'.join(map(str, c['shape']))} stride {c['stride'][0]}"
            ms = (c.get("chain_ms"), c.get("merged_ms"))
        else:
            decision = "keep"
            why = skipped[0]["why"] if skipped else "not part of a mergeable chain"
            ms = (None, None)
        rows.append([b.name, ",".join(b.kinds) or "none (linear)",
                     "" if s is None else "/".join(f"{v:.3f}" for v in s.nonlinear),
                     "" if s is None else f"{s.agreement_alone:.3f}",
                     "" if ms[0] is None else f"{ms[0]:.3f}", "" if ms[1] is None else f"{ms[1]:.3f}",
                     decision, why])
    cols = ["block", "activations", "non-linear share", "agreement alone", "chain ms", "merged ms", "decision",
            "why"]
    return cols, rows


def analyze(model, calib: dict | None = None, target=None, pins=None, cost=None, sparse_min: float = 2 / 3,
            final_activation: bool = False) -> dict:
    from compiler.analyze_sparse import sparse_sections
    spec = targets.resolve(target, None)
    mod, info = cleaned(model, spec, pins)
    report = {"model": str(getattr(info, "path", model)), "target": spec.name}
    add_section(report, "depth (DepthShrinker blocks)", *depth_section(mod, spec, calib, cost, final_activation))
    if spec.is_cpu:
        for title, cols, rows in sparse_sections(mod, spec, cost, sparse_min):
            add_section(report, title, cols, rows)
    return report


def render(report: dict) -> str:
    lines = [f"model: {report['model']}  target: {report['target']}"]
    for sec in report.get("sections", []):
        lines += ["", f"## {sec['title']}"]
        table = [sec["columns"]] + [[str(v) for v in r] for r in sec["rows"]]
        widths = [max(len(r[i]) for r in table) for i in range(len(sec["columns"]) - 1)]
        for r in table:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
    return "\n".join(lines)
