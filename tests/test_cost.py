"""The one cost interface: measured on the host, cached per (target, key), estimated elsewhere."""
import numpy as np
import pytest
import tvm
from tvm import relax

import targets
from compiler.cost import Cost, estimate, structural_key


def conv_module(cin: int, cout: int, hw: int, k: int = 1) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, cin, hw, hw], "float32"))
    w = relax.const(np.random.default_rng(0).standard_normal((cout, cin, k, k)).astype("float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(x, w, padding=k // 2))
        bb.emit_func_output(y)
    return bb.get()


def test_measures_once_then_reads_the_cache(tmp_path):
    spec = targets.resolve("x86")
    cost = Cost(spec, cache_dir=str(tmp_path), enabled=True)
    small = cost.latency(conv_module(16, 16, 8))
    assert small > 0 and cost.measured == 1
    again = Cost(spec, cache_dir=str(tmp_path), enabled=True)
    assert again.latency(conv_module(16, 16, 8)) == small and again.measured == 0
    big = again.latency(conv_module(64, 64, 28, k=3))
    assert again.measured == 1 and big > small


def test_candidates_not_cached_are_measured_run_by_run_in_turn(tmp_path, monkeypatch):
    """latencies(): the uncached modules of one decision are timed together, one run of each in turn (a slow
    phase of the machine hits them alike); a cached one is not run again."""
    import compiler.cost as cost_module
    spec = targets.resolve("x86")
    cost = Cost(spec, cache_dir=str(tmp_path), enabled=True)
    cached = cost.latency(conv_module(8, 8, 4))
    runs = []
    monkeypatch.setattr(cost_module, "runnable", lambda mod, spec: (lambda name=mod["main"].params[0].ty.shape[1]:
                                                                     runs.append(int(name))))
    out = cost.latencies([(conv_module(8, 8, 4), None), (conv_module(16, 16, 4), None), (conv_module(24, 24, 4), "k")])
    assert out[0] == cached and cost.measured == 3 and all(t >= 0 for t in out)
    assert runs == [16, 24] * (cost_module.WARMUP + cost_module.REPEAT)
    assert cost.latency(conv_module(24, 24, 4), "k") == out[2] and cost.measured == 3


def test_together_measures_a_cached_candidate_again_beside_a_new_one(tmp_path, monkeypatch):
    """latencies(together=True) (KeepIfFaster's whole-model checks): where one candidate is new, the cached one is
    timed again with it, not weighed from another moment; where all are cached, none runs."""
    import compiler.cost as cost_module
    cost = Cost(targets.resolve("x86"), cache_dir=str(tmp_path), enabled=True)
    cost.latency(conv_module(8, 8, 4))
    runs = []
    monkeypatch.setattr(cost_module, "runnable", lambda mod, spec: (lambda name=mod["main"].params[0].ty.shape[1]:
                                                                     runs.append(int(name))))
    cost.latencies([(conv_module(8, 8, 4), None), (conv_module(16, 16, 4), None)], together=True)
    assert runs == [8, 16] * (cost_module.WARMUP + cost_module.REPEAT) and cost.measured == 3
    runs.clear()
    cost.latencies([(conv_module(8, 8, 4), None), (conv_module(16, 16, 4), None)], together=True)
    assert runs == [] and cost.measured == 3


def test_cross_targets_are_estimated_not_run(tmp_path):
    cost = Cost(targets.resolve("rpi4"), cache_dir=str(tmp_path))
    assert not cost.enabled
    small, big = cost.latency(conv_module(16, 16, 8)), cost.latency(conv_module(64, 64, 28, k=3))
    assert 0 < small < big and cost.measured == 0


def test_key_tells_weights_apart():
    a, b = conv_module(8, 8, 4), conv_module(8, 8, 4)
    assert structural_key(a) == structural_key(b)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 8, 4, 4], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(x, relax.const(np.ones((8, 8, 1, 1), "float32"))))
        bb.emit_func_output(y)
    assert structural_key(bb.get()) != structural_key(a)


def test_corrupt_cache_only_costs_a_remeasure(tmp_path):
    (tmp_path / "costs.json").write_text("{not json")
    cost = Cost(targets.resolve("x86"), cache_dir=str(tmp_path), enabled=True)
    assert cost.latency(conv_module(8, 8, 4)) > 0 and cost.measured == 1


def test_changed_kernel_defaults_remeasure(tmp_path):
    """A latency cached for one set of schedules is not reused once the target's kernel defaults
    (or the schedules' source) change: those are different kernels."""
    import dataclasses
    spec = targets.resolve("x86")
    first = Cost(spec, cache_dir=str(tmp_path), enabled=True)
    first.latency(conv_module(16, 16, 8))
    other = dataclasses.replace(spec, kernel_defaults={**spec.kernel_defaults, "max_pixel_tile": 3})  # no host has 3
    again = Cost(other, cache_dir=str(tmp_path), enabled=True)
    again.latency(conv_module(16, 16, 8))
    assert again.measured == 1
    same = Cost(spec, cache_dir=str(tmp_path), enabled=True)
    same.latency(conv_module(16, 16, 8))
    assert same.measured == 0
