"""tools/benchlib.py: the statistics the benchmark pages are made of (no timing asserted)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import benchlib  # noqa: E402


def test_paired_ratio_ignores_a_slow_phase_that_hits_both():
    """Two runtimes at a true ratio of 0.8; the second half of the run is 2x slower for both. The ratio
    of overall medians depends on which runs the slow phase caught; the paired ratio does not."""
    a = [0.8] * 10 + [1.6] * 10
    b = [1.0] * 8 + [2.0] * 12          # b's bursts straddle the phase change differently
    assert abs(benchlib.paired_ratio(a, b, group=5) - 0.8) < 1e-9
    assert abs(benchlib.paired_ratio([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) - 0.5) < 1e-9


def test_paired_ratio_sees_a_real_difference():
    assert benchlib.paired_ratio([1.2] * 10, [1.0] * 10, group=5) > 1.1


def test_sparse_layer_kernels_compute_the_layer():
    """tools/bench_sparse.kernel_runnable calls the spmm kernel of a layer module on its own constants:
    the output it fills equals the dense layer's (relu6(W x + b)) on the same input."""
    import numpy as np

    import bench_sparse
    import targets
    from passes.sparsify_conv1x1 import sparse_layer_module
    from zoo.onnx_builder import zero_out
    spec = targets.resolve("x86")
    rng = np.random.default_rng(0)
    w = zero_out(rng.standard_normal((24, 40)).astype(np.float32), 0.85, 1, rng)
    plan = {"w": w, "h": 5, "wd": 6, "residual": None, "bias": rng.standard_normal(24).astype(np.float32),
            "clip": (0.0, 6.0)}
    call = bench_sparse.kernel_runnable(sparse_layer_module(plan, 1, spec), spec)
    ((_kernel, arrays),) = call.calls
    call()
    x, out = arrays[0].numpy(), arrays[-1].numpy()
    want = np.clip(np.einsum("oc,nchw->nohw", w, x) + plan["bias"][None, :, None, None], 0, 6)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


def test_classifier_bench_times_every_spmv_kernel():
    """tools/bench_sparse.bench_fc (the page's classifier table) builds its layers from bare plans: a dense
    time and one per spmv kernel of the target (a smoke run: one round, a small layer)."""
    import bench_sparse
    import targets
    from passes.sparsify_dense import kernel_name, kernels
    spec = targets.resolve(None)
    out = bench_sparse.bench_fc([0.9], 1, spec, k=64, n=32)
    assert out["dense_ms"] > 0
    assert sorted(out["sparse_ms"]) == sorted(f"0.90/{kernel_name(k)}" for k in kernels(spec))


def test_layer_bench_times_bursts_and_says_so(tmp_path):
    """tools/bench_sparse.bench_layer with a burst times every run of every kernel (rounds x burst each), and the
    page's per-layer section names the burst (a smoke run: a small 7x7 layer, one round of 3)."""
    import benchlib
    import bench_sparse
    import targets
    spec = targets.resolve(None)
    shape = {"cin": 32, "cout": 16, "h": 7, "w": 7, "relu6": False, "count": 1, "layers": ["x"]}
    seen = []
    real = benchlib.interleave

    def spy(fns, rounds, warmup=5, burst=1):
        out = real(fns, rounds, warmup, burst)
        seen.append({k: len(v) for k, v in out.items()})
        return out
    benchlib.interleave = spy
    try:
        r = bench_sparse.bench_layer(shape, [0.9], [1], 1, spec, burst=3)
    finally:
        benchlib.interleave = real
    assert seen == [{"dense": 3, (0.9, 1): 3}]
    assert r["burst"] == 3 and r["dense_ms"] > 0 and r["sparse_ms"]["0.90/1"] > 0
    page = tmp_path / "page.md"
    bench_sparse.write_md(str(page), "cmd", [r], [], [0.9], [1], 1.0)
    assert "3 run(s) of a kernel back to back in each round" in page.read_text()


def test_a_partial_sparse_page_names_its_own_chart():
    """bench.py sparse --out PAGE: a model's usual page keeps the chart the README links; any other page gets a
    chart of its own name, so a partial run does not overwrite the full sweep's chart."""
    import bench_sparse
    assert bench_sparse.chart_name("mobilenet_v2", "benchmarks/RESULTS-sparse.md") == "sparse_vs_onnxruntime.png"
    assert bench_sparse.chart_name("blazeface", "RESULTS-sparse-blazeface.md") == "sparse_vs_onnxruntime_blazeface.png"
    assert bench_sparse.chart_name("mobilenet_v2", "benchmarks/RESULTS-sparse-85.md") == "RESULTS-sparse-85.png"


def test_bound_counts_multiply_adds_of_the_imported_model():
    """tools/bench_bound.model_macs: a strided 3x3 conv, a grouped 1x1 conv and a classifier, counted by hand."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    import bench_bound
    from compiler import driver
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(8, 4, 1, 1)).astype(np.float32), "w2")
    fc = numpy_helper.from_array(rng.normal(size=(8, 5)).astype(np.float32), "fc")
    graph = helper.make_graph([
        helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], group=2),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["y"])],
        "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], [w1, w2, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    mod, _ = driver.import_model(model, None)
    macs = bench_bound.model_macs(mod)
    assert macs == {"conv2d": 8 * 8 * 8 * 27 + 8 * 8 * 8 * 4, "matmul": 8 * 5}


def test_bound_peak_kernel_computes_its_chains():
    """The FMA-peak kernel does what its FLOP count says: acc <- acc * c + d, `steps` times per lane."""
    import numpy as np
    import tvm

    import bench_bound
    import targets
    from compiler import artifact  # noqa: F401
    spec = targets.resolve(None, None)
    lanes, acc, steps = spec.vector_lanes, 2, 10
    lib = tvm.compile(tvm.IRModule({"main": bench_bound.peak_kernel(lanes, acc, steps)}), target=spec.tvm_target())
    a = np.linspace(-1, 1, acc * lanes).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros_like(a), tvm.cpu())
    lib["main"](tvm.runtime.tensor(a, tvm.cpu()), out)
    want = a.astype(np.float64)
    for _ in range(steps):
        want = want * 0.999999 + 1e-7
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6, atol=1e-7)
