"""`tools/bench.py sparse`: sparse 1x1 and FC kernels per layer, sparse MobileNetV2 end to end, library size.

(a) per layer: each distinct 1x1 conv shape of MobileNetV2 1.0 224, our spmm at every sparsity
    (unstructured -> block-1 kernel, 4x1-blocked zeros -> block-4 kernel) against OUR dense 1x1
    (the blocked NCHW{b}c kernel phase 4 gives it, no layout transforms timed), all of one shape
    interleaved in one process at 1 thread; then the 1280->1000 classifier, our dense fully connected
    kernel against the spmv at every sparsity.
(b) end to end: MobileNetV2 1.0 224 (or `--model`, another built-in) with that share of zeros in every
    1x1 weight and in the classifier (zoo's sparse_fc, where the model has it; MobileNetV3's and
    EfficientNet-Lite0's builders prune the 1x1 convs outside squeeze-and-excitation only):
    shrinkc `--sparse auto` vs shrinkc `--sparse off` vs ONNX Runtime,
    all on the SAME weights; 1 thread interleaved in this process, 2+ threads one process per
    runtime, bursts alternating.
(c) library size of `--sparse auto` vs `--sparse off`: the model of (b) (1x1 + classifier pruned), and
    the same sparsity in the 1x1 weights only (classifier dense), compiled for its size alone.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time

import numpy as np

import benchlib

LAYER_SEED = 0
CHART = "sparse_vs_onnxruntime.png"
DEFAULT_PAGE = "RESULTS-sparse.md"
DEFAULT_MODEL = "mobilenet_v2"
TITLES = {"mobilenet_v2": "MobileNetV2 1.0 224", "mobilenet_v3_large": "MobileNetV3-Large 1.0 224 (squeeze-and-"
          "excitation and hard swish; its SE convs and classifier stay dense)",
          "efficientnet_lite0": "EfficientNet-Lite0 224 (its classifier stays dense)",
          "efficientnet_b0": "EfficientNet-B0 224 (SiLU and squeeze-and-excitation; its SE convs and classifier "
          "stay dense)",
          "blazeface": "BlazeFace-style face detector 128 (MediaPipe short-range front model; its heads stay dense)"}
CLIP_LAYERS = (".expand", "head")      # 1x1 convs followed by ReLU6 in MobileNetV2 (projects are linear)


# --- (a) per layer ---------------------------------------------------------------------------------
def mobilenet_v2_1x1_shapes() -> list[dict]:
    """Distinct (cin, cout, h, w, relu6) of MobileNetV2 1.0 224's 1x1 convs, with how often each occurs."""
    import onnx

    import zoo
    model = onnx.shape_inference.infer_shapes(zoo.build("mobilenet_v2"))
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.value_info) + list(model.graph.input)}
    inits = {i.name: i.dims for i in model.graph.initializer}
    shapes: dict[tuple, dict] = {}
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "Conv" else None
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if w is None or list(w[2:]) != [1, 1] or group != 1:
            continue
        _, cin, h, wd = dims[node.input[0]]
        key = (cin, w[0], h, wd, any(node.name.endswith(s) for s in CLIP_LAYERS))
        shapes.setdefault(key, {"cin": cin, "cout": w[0], "h": h, "w": wd, "relu6": key[4], "count": 0,
                                "layers": []})
        shapes[key]["count"] += 1
        shapes[key]["layers"].append(node.name)
    return list(shapes.values())


def _plan(shape: dict, w: np.ndarray, rng, spec=None) -> dict:
    """The layer's plan; with spec, its input and output stored as in the network: padded planes where their
    planes are not whole vectors (`in_plane`: a project conv reads a depthwise output FormCHWRegions pads, an
    expand conv a block output PadChannelPlanes pads; `out_plane`: a project conv writes a block output, an
    expand conv (ReLU6) feeds a depthwise conv, which reads planes as they are)."""
    from schedules.chw_rows import aligned_plane
    plane = aligned_plane(shape["h"] * shape["w"], spec.vector_lanes) if spec else None
    return {"w": w, "h": shape["h"], "wd": shape["w"], "residual": None, "in_plane": plane,
            "out_plane": None if shape["relu6"] else plane,
            "bias": (rng.standard_normal(shape["cout"]) * 0.05).astype(np.float32),
            "clip": (0.0, 6.0) if shape["relu6"] else None}


def kernel_runnable(mod, spec, seed: int = 0):
    """A no-argument call of the TIR kernels phase 4 lowers a layer module to, each called directly on
    arrays allocated once (weights from the module's constants, inputs random, outputs zeroed).

    NOTE: inside a network the memory plan allocates every tensor once; timing the module through
    the VM would add a fresh output allocation per call (page faults on every call for a 4.8 MB
    112x112 output, which timed longer than that layer's spmm)."""
    import tvm
    from tvm import relax

    from compiler import artifact
    from compiler.cost import lowered
    mod = lowered(mod, spec)
    rng = np.random.default_rng(seed)
    dev = tvm.cpu(0)
    calls = []

    def array(ty):
        shape = [int(d) for d in ty.shape.values]
        return tvm.runtime.tensor(rng.uniform(-1, 1, size=shape).astype(str(ty.dtype)), dev)

    for binding in mod["main"].body.blocks[0].bindings:
        call = binding.value
        if not (isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.call_tir"))):
            raise ValueError(f"layer module binding is not a kernel call: {call}")
        gv, args = call.args[0], call.args[1].fields
        ins = [tvm.runtime.tensor(a.value.numpy(), dev) if isinstance(a, tvm.ir.Constant) else array(a.ty)
               for a in args]
        kernel = artifact.build_kernel(mod[gv], spec).jit()["main"]
        calls.append((kernel, ins + [array(binding.var.ty)]))

    def run():
        for kernel, arrays in calls:
            kernel(*arrays)
    run.calls = calls   # (kernel, its arrays) in order, for checking what they compute
    return run


def bench_layer(shape: dict, sparsities: list[float], blocks: list[int], rounds: int, spec, burst: int = 1) -> dict:
    """Medians of our dense 1x1 and of the spmm at each (sparsity, block), interleaved, kernels only; burst: runs
    of a kernel back to back in each round (all timed)."""
    from passes.sparsify_conv1x1 import dense_layer_module, sparse_layer_module
    from zoo.onnx_builder import zero_out
    rng = np.random.default_rng(LAYER_SEED)
    w = rng.standard_normal((shape["cout"], shape["cin"])).astype(np.float32)
    fns = {"dense": kernel_runnable(dense_layer_module(_plan(shape, w, rng), spec), spec)}
    for s in sparsities:
        for b in blocks:
            plan = _plan(shape, zero_out(w, s, b, rng), rng, spec)
            fns[(s, b)] = kernel_runnable(sparse_layer_module(plan, b, spec), spec)
    times = benchlib.interleave(fns, rounds, burst=burst)
    med = {k: benchlib.stats(v)["median_ms"] for k, v in times.items()}
    return {**{k: v for k, v in shape.items() if k != "layers"}, "burst": burst, "dense_ms": med["dense"],
            "sparse_ms": {f"{s:.2f}/{b}": med[(s, b)] for s in sparsities for b in blocks}}


def bench_fc(sparsities: list[float], rounds: int, spec, k: int = 1280, n: int = 1000) -> dict:
    """MobileNetV2's classifier (k -> n, bias): our dense fully connected kernel against each spmv kernel
    the target has (sparsify_dense.kernels) at each sparsity (unstructured), interleaved."""
    from compiler.cost import runnable
    from passes.sparsify_dense import dense_layer_module, kernel_name, kernels, sparse_layer_module
    from zoo.onnx_builder import zero_out
    rng = np.random.default_rng(LAYER_SEED)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = (rng.standard_normal(n) * 0.05).astype(np.float32)
    fns = {"dense": runnable(dense_layer_module({"w": w, "bias": bias}), spec)}
    for s in sparsities:
        plan = {"w": zero_out(w, s, 1, rng), "bias": bias}
        for kernel in kernels(spec):
            fns[(s, kernel_name(kernel))] = runnable(sparse_layer_module(plan, kernel), spec)
    med = {key: benchlib.stats(t)["median_ms"] for key, t in benchlib.interleave(fns, rounds).items()}
    return {"k": k, "n": n, "dense_ms": med.pop("dense"),
            "sparse_ms": {f"{s:.2f}/{kernel}": v for (s, kernel), v in med.items()}}


# --- (b, c) end to end -----------------------------------------------------------------------------
def weight_megabytes(model) -> dict[str, float]:
    """float32 weight MB of the ONNX model: the 1x1 convs, the fully connected (Gemm) layers, and the rest."""
    from onnx import numpy_helper
    pointwise = {n.input[1] for n in model.graph.node if n.op_type == "Conv"
                 and next((a.i for a in n.attribute if a.name == "group"), 1) == 1
                 and list(next(a.ints for a in n.attribute if a.name == "kernel_shape")) == [1, 1]}
    fc = {n.input[1] for n in model.graph.node if n.op_type == "Gemm"}
    out = {"1x1": 0.0, "fc": 0.0, "other": 0.0}
    for init in model.graph.initializer:
        kind = "1x1" if init.name in pointwise else "fc" if init.name in fc else "other"
        out[kind] += numpy_helper.to_array(init).nbytes / 1e6
    return out


def sparse_model(name: str, sparsity: float, block: int, fc: bool):
    """The built-in model `name` with `sparsity` zeros in its 1x1 weights (in blocks of `block` output
    channels) and, where fc and the model can, in its classifier."""
    import zoo
    opts = {"sparsity": sparsity}
    if "sparse_block" in zoo.options(name):
        opts["sparse_block"] = block
    elif block != 1:
        raise SystemExit(f"--blocks {block}: the built-in {name} has unstructured zeros only; use --blocks 1")
    if fc and "sparse_fc" in zoo.options(name):
        opts["sparse_fc"] = True
    return zoo.build(name, **opts)


def bench_model(sparsity: float, block: int, threads: list[int], rounds: int, work: str,
                name: str = DEFAULT_MODEL) -> dict:
    import onnx
    import onnxruntime as ort

    import compiler
    import zoo
    from compiler import runtime
    tag = f"{name}_{round(sparsity * 100)}_{block}x1"
    path = os.path.join(work, f"{tag}.onnx")
    model = sparse_model(name, sparsity, block, fc=True)
    onnx.save(model, path)
    out = {"model": name, "sparse_fc": "sparse_fc" in zoo.options(name), "sparsity": sparsity, "block": block,
           "threads": {}, "weights_mb": weight_megabytes(model)}
    out["size_auto_1x1_only_mb"], out["sparse_layers_1x1_only"] = _size_1x1_only(name, sparsity, block, work)
    libs = {}
    for mode in ("auto", "off"):
        t0 = time.perf_counter()
        cm = compiler.compile_model(path, sparse=mode)
        out[f"compile_{mode}_s"] = time.perf_counter() - t0
        libs[mode], _ = cm.export(os.path.join(work, f"{tag}_{mode}.so"))
        out[f"size_{mode}_mb"] = os.path.getsize(libs[mode]) / 1e6
        if mode == "auto":
            inputs = runtime.random_inputs(cm.metadata()["inputs"], seed=0)
            out["max_rel_err"] = max(r.rel_err for r in cm.verify(inputs))
            passes = cm.report["passes"]
            out["sparse_layers"] = _sparse_count(passes)
            out["kept"] = "SparseRegions" in passes and bool(passes["SparseRegions"].get("counts", {}).get("kept"))
    npz = os.path.join(work, f"{tag}_inputs.npz")
    np.savez(npz, **inputs)
    names = {"auto": "shrinkc sparse", "off": "shrinkc dense"}
    for n in threads:
        if n == 1:
            fns = benchlib.library_calls({names[mode]: so for mode, so in libs.items()}, inputs)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            fns["onnxruntime"] = lambda: sess.run(None, inputs)
            times = benchlib.interleave(fns, rounds)
        else:
            runtimes = {names[m]: ("shrinkc", so) for m, so in libs.items()}
            times = benchlib.alternate_runtimes({**runtimes, "onnxruntime": ("onnxruntime", path)}, npz, n, rounds)
        out["threads"][n] = {k: benchlib.stats(v) for k, v in times.items()}
    return out


def _sparse_count(passes: dict) -> dict[str, int]:
    """How many 1x1 convs and fully connected layers run sparse."""
    return {kind: passes.get(name, {}).get("counts", {}).get("sparse", 0)
            for kind, name in (("1x1", "SparsifyConv1x1"), ("fc", "SparsifyDense"))}


def _size_1x1_only(name: str, sparsity: float, block: int, work: str) -> tuple[float, dict]:
    """MB of the `--sparse auto` library of the model with the same 1x1 zeros and a dense classifier."""
    import compiler
    cm = compiler.compile_model(sparse_model(name, sparsity, block, fc=False), sparse="auto")
    so, _ = cm.export(os.path.join(work, f"{name}_{round(sparsity * 100)}_{block}x1_1x1_only.so"))
    return os.path.getsize(so) / 1e6, _sparse_count(cm.report["passes"])


# --- report ----------------------------------------------------------------------------------------
def _pct(s: float) -> str:
    return f"{round(s * 100)}%"


def _layers(counts: dict) -> str:
    return f"{counts['1x1']} / {counts['fc']}"


def _zeros(block: int) -> str:
    return "u" if block == 1 else f"{block}x1"


def write_md(path: str, command: str, layers: list[dict], models: list[dict], sparsities, blocks, wall_s,
             fc: dict | None = None) -> None:
    lines = ["# Sparse 1x1 kernels: per layer, end to end, library size", "",
             f"- date: {datetime.date.today()}", f"- machine: {benchlib.machine()}", f"- command: `{command}`",
             f"- wall time of the whole run: {wall_s / 60:.1f} min",
             "- zeros: unstructured (kernel block 1), or 4x1 = whole blocks of 4 output channels x 1 input "
             "channel (kernel block 4); exactly round(sparsity x blocks) zero blocks per weight.", ""]
    if layers:
        lines += ["## (a) per layer: our dense 1x1 median / our spmm median (above 1 = spmm faster)", "",
                  "MobileNetV2 1.0 224's distinct 1x1 shapes, 1 thread, every kernel of a shape interleaved "
                  f"round by round after warm-up, {layers[0].get('burst', 1)} run(s) of a kernel back to back in "
                  "each round, all timed (from 2 on, most runs find the kernel's buffers in cache, as a kernel in "
                  "a network finds the input its producer just wrote; with one, the buffers of all the shape's "
                  "kernels in rotation, up to 34 MB at 112x112, left the large layers' data in memory). Dense = our blocked NCHW{b}c 1x1 conv with fused bias/ReLU6 "
                  "(no layout transforms timed); spmm = f32_spmm_chw with the same epilogue (residual adds left out); "
                  "the spmm reads its input and writes its output as the network stores them: planes padded to "
                  "whole vectors where H x W is not (14x14: 208, 7x7: 64), except a ReLU6 (expand) conv's output, "
                  "which a depthwise kernel reads as it is. "
                  "Both are called as kernels on buffers allocated once, as in a network's memory plan (through "
                  "the VM each call would also allocate its output). "
                  "n = how often the shape occurs in the network; the last row weighs each shape by n.", ""]
        cols = [f"{_pct(s)} {_zeros(b)}" for s in sparsities for b in blocks]
        lines += ["| cin->cout @ HxW | n | relu6 | dense ms | " + " | ".join(cols) + " |",
                  "|---" * (4 + len(cols)) + "|"]
        for r in layers:
            ratios = [r["dense_ms"] / r["sparse_ms"][f"{s:.2f}/{b}"] for s in sparsities for b in blocks]
            lines.append(f"| {r['cin']}->{r['cout']} @ {r['h']}x{r['w']} | {r['count']} | {'y' if r['relu6'] else ''}"
                         f" | {r['dense_ms']:.3f} | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")
        total_dense = sum(r["count"] * r["dense_ms"] for r in layers)
        totals = [total_dense / sum(r["count"] * r["sparse_ms"][f"{s:.2f}/{b}"] for r in layers)
                  for s in sparsities for b in blocks]
        lines.append(f"| **all 1x1 of the network** (sum x n) | {sum(r['count'] for r in layers)} | | "
                     f"{total_dense:.3f} | " + " | ".join(f"**{x:.2f}**" for x in totals) + " |")
        lines += ["", "Goal (issue 5): unstructured >= 3x at 80% and >= 4x at 85%.", ""]
    if fc:
        lines += ["## (a') the classifier: our dense fully connected median / our spmv median (above 1 = spmv "
                  "faster)", "", f"{fc['k']} -> {fc['n']} with bias at batch 1, 1 thread, interleaved; unstructured "
                  "zeros; spmv = f32_spmv_perm_16x32 (AVX-512: inputs picked from registers) or f32_spmv_sell_R "
                  "(R output rows per slice, inputs gathered). SparsifyDense takes the fastest and keeps the layer "
                  "dense wherever it is below 1 on the target.", "",
                  "| spmv | dense ms | " + " | ".join(_pct(s) for s in sparsities) + " |",
                  "|---" * (2 + len(sparsities)) + "|"]
        for kernel in dict.fromkeys(key.split("/")[1] for key in fc["sparse_ms"]):
            lines.append(f"| {kernel} | {fc['dense_ms']:.3f} | " + " | ".join(
                f"{fc['dense_ms'] / fc['sparse_ms'][f'{s:.2f}/{kernel}']:.2f}" for s in sparsities) + " |")
        lines.append("")
    if models:
        name = models[0]["model"]
        lines += [f"## (b) end to end: {TITLES.get(name, name)}, every 1x1 weight"
                  f"{' and the classifier' if models[0]['sparse_fc'] else ''} sparse", "",
                  "Same weights for all three. 1 thread: one process, runs interleaved after warm-up; 2 threads: "
                  "each runtime in its own process, bursts of 5 alternating. Medians in ms; 'vs ORT' and "
                  "'vs dense' = other median / shrinkc sparse median (above 1 = shrinkc sparse faster).", "",
                  "| zeros | blocks | threads | shrinkc sparse | shrinkc dense | ONNX Runtime | vs ORT | vs dense | "
                  "sparse layers 1x1 / fc | kept | max rel. err |", "|---" * 11 + "|"]
        for m in models:
            for n, t in m["threads"].items():
                s, d, o = (t[k]["median_ms"] for k in ("shrinkc sparse", "shrinkc dense", "onnxruntime"))
                lines.append(f"| {_pct(m['sparsity'])} | {_zeros(m['block'])} | {n} | "
                             f"{s:.2f} | {d:.2f} | {o:.2f} | **{o / s:.2f}** | **{d / s:.2f}** | "
                             f"{_layers(m['sparse_layers'])} | {'yes' if m['kept'] else 'no'} | "
                             f"{m['max_rel_err']:.1e} |")
        goals = ("Goals: 85% >= 2.5x faster than ONNX Runtime at 1 thread, >= 2x at 2 threads; faster than our "
                 "dense compile from 70% up." if name == DEFAULT_MODEL else
                 "Issue 5 sets its goals on MobileNetV2 (RESULTS-sparse.md); this is the same measurement on "
                 "another model.")
        lines += ["", goals, "", f"![speed-up over ONNX Runtime]({chart_name(name, path)})", "",
                  "## (c) library size: `--sparse auto` / `--sparse off`", "",
                  "Two models per row, with the same zeros in every 1x1 weight: '1x1 only' keeps a dense classifier, "
                  "'1x1 + fc' is the model of (b) with the classifier pruned too. The dense library is the same size "
                  "for both. Weights as dense float32: '1x1' and 'fc' are what the sparse encodings compress (values "
                  "+ int16 column index where the input channels fit, else int32), 'other' (stem, depthwise, biases) "
                  "stays dense. A layer the cost interface finds slower sparse stays dense (sparse layers column)."
                  + ("" if models[0]["sparse_fc"] else " This model's builder prunes no classifier: both sparse "
                     "columns are one model, its 'fc' weights stay dense (and squeeze-and-excitation convs, counted "
                     "in '1x1', are not pruned)."),
                  "",
                  "| zeros | blocks | sparse .so MB, 1x1 only | sparse .so MB, 1x1 + fc | dense .so MB "
                  "| ratio 1x1 only | ratio 1x1 + fc | sparse layers 1x1 / fc (1x1 only; 1x1 + fc) "
                  "| 1x1 / fc / other weights MB | compile auto / off (s) |", "|---" * 10 + "|"]
        for m in models:
            d, w = m["size_off_mb"], m["weights_mb"]
            lines.append(f"| {_pct(m['sparsity'])} | {_zeros(m['block'])} | {m['size_auto_1x1_only_mb']:.2f} | "
                         f"{m['size_auto_mb']:.2f} | {d:.2f} | **{m['size_auto_1x1_only_mb'] / d:.2f}** | "
                         f"**{m['size_auto_mb'] / d:.2f}** | {_layers(m['sparse_layers_1x1_only'])}; "
                         f"{_layers(m['sparse_layers'])} | {w['1x1']:.2f} / {w['fc']:.2f} / {w['other']:.2f}"
                         f" | {m['compile_auto_s']:.0f} / {m['compile_off_s']:.0f} |")
        if name == DEFAULT_MODEL:
            lines += ["", "Goal: the 85% model's library <= 0.5x the dense one."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def chart_name(model: str, page: str) -> str:
    """The chart beside a page: sparse_vs_onnxruntime[_MODEL].png for a model's usual page (RESULTS-sparse.md,
    RESULTS-sparse-MODEL.md), else the page's own stem, so a partial run does not overwrite a sweep's chart."""
    if os.path.basename(page) != (DEFAULT_PAGE if model == DEFAULT_MODEL else f"RESULTS-sparse-{model}.md"):
        return os.path.splitext(os.path.basename(page))[0] + ".png"
    return CHART if model == DEFAULT_MODEL else f"sparse_vs_onnxruntime_{model}.png"


def chart(path: str, models: list[dict]) -> None:
    series = {}
    for m in models:
        for n, t in m["threads"].items():
            name = f"{_zeros(m['block'])}, {n} thread{'s' if n > 1 else ''}"
            xs, ys = series.setdefault(name, ([], []))
            xs.append(round(m["sparsity"] * 100))
            ys.append(t["onnxruntime"]["median_ms"] / t["shrinkc sparse"]["median_ms"])
    if series:
        title = TITLES.get(models[0]["model"], models[0]["model"]).split(" (")[0]
        benchlib.line_chart(path, f"{title}: shrinkc sparse speed-up over ONNX Runtime", series,
                            "% zeros in 1x1 weights", "ONNX Runtime ms / shrinkc ms")


def cmd_sparse(args) -> None:
    import targets
    t_start = time.perf_counter()
    sparsities = [int(s) / 100 for s in args.sparsities.split(",")]
    blocks = [int(b) for b in args.blocks.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    os.makedirs(args.out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="shrinkc-bench-sparse-")
    layers, models, fc = [], [], None
    if not args.skip_layers:
        spec = targets.resolve(None, None)
        shapes = mobilenet_v2_1x1_shapes()
        if args.max_shapes:
            shapes = shapes[:args.max_shapes]
        for shape in shapes:
            r = bench_layer(shape, sparsities, blocks, args.layer_rounds, spec, args.layer_burst)
            layers.append(r)
            print(f"{r['cin']}->{r['cout']} @{r['h']}x{r['w']}: dense {r['dense_ms']:.3f} ms, speed-up " + ", ".join(
                f"{k} {r['dense_ms'] / v:.2f}" for k, v in r["sparse_ms"].items()), flush=True)
        fc = bench_fc(sparsities, args.layer_rounds, spec)
        print(f"classifier {fc['k']}->{fc['n']}: dense {fc['dense_ms']:.3f} ms, speed-up " + ", ".join(
            f"{k} {fc['dense_ms'] / v:.2f}" for k, v in fc["sparse_ms"].items()), flush=True)
    if not args.skip_models:
        for b in blocks:
            for s in sparsities:
                m = bench_model(s, b, threads, args.rounds, work, args.model)
                models.append(m)
                for n, t in m["threads"].items():
                    print(f"{args.model} {_pct(s)} block {b} x{n}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms"
                                                                      for k, v in t.items()), flush=True)
                print(f"  size sparse (1x1 only) / sparse (1x1 + fc) / dense {m['size_auto_1x1_only_mb']:.2f} / "
                      f"{m['size_auto_mb']:.2f} / {m['size_off_mb']:.2f} MB", flush=True)
    out = os.path.join(args.out_dir, args.out)
    write_md(out, "python tools/bench.py " + " ".join(sys.argv[1:]), layers, models, sparsities, blocks,
             time.perf_counter() - t_start, fc)
    chart(os.path.join(os.path.dirname(out), chart_name(args.model, out)), models)   # beside the page that names it
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"layers": layers, "classifier": fc, "models": models}, f, indent=1, default=str)
    print(f"wrote {out}")


def add_parser(sub, default_out_dir: str) -> None:
    p = sub.add_parser("sparse", help="sparse 1x1: per layer vs our dense, MobileNetV2 vs ONNX Runtime, size")
    p.add_argument("--sparsities", default="70,80,85,90,95", help="percent zeros in the 1x1 weights")
    p.add_argument("--blocks", default="1,4", help="1 = unstructured zeros, 4 = 4x1 blocks")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=20, help="end-to-end runs per runtime at 1 thread")
    p.add_argument("--layer-rounds", type=int, default=40, help="runs per kernel per layer shape")
    p.add_argument("--layer-burst", type=int, default=5,
                   help="runs of a layer kernel back to back per round (1: each after the shape's other kernels)")
    p.add_argument("--max-shapes", type=int, default=0, help="only the first N layer shapes (smoke runs)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="the built-in model of the end-to-end and size sections (mobilenet_v3_large, ...)")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--out-dir", default=default_out_dir)
    p.add_argument("--out", default=DEFAULT_PAGE)
    p.set_defaults(func=cmd_sparse)
