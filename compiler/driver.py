"""compile_model(): model file -> import -> pipeline -> build, as a CompiledModel to export, run or verify."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

import targets
from compiler import artifact, pipeline, runtime, verify
from compiler.frontend.model_info import ModelInfo
from targets.errors import ShrinkcError


def detect_format(path: str) -> str:
    if not os.path.exists(path):
        raise ShrinkcError(f"model file '{path}' does not exist", "check the path")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.endswith(".tflite") or head[4:8] == b"TFL3":
        return "tflite"
    if path.endswith(".onnx") or path.endswith(".pb"):
        return "onnx"
    raise ShrinkcError(f"'{path}' is neither an ONNX (.onnx) nor a TFLite (.tflite) model",
                       "pass an .onnx or .tflite file")


def import_model(model, pins: dict | None = None):
    """Any supported model (path, or onnx.ModelProto) -> (Relax module, ModelInfo)."""
    import onnx
    if isinstance(model, onnx.ModelProto):
        from compiler.frontend.onnx_import import import_onnx
        return import_onnx(model, pins)
    path = os.fspath(model)
    if detect_format(path) == "tflite":
        from compiler.frontend.tflite_import import import_tflite
        return import_tflite(path, pins)
    from compiler.frontend.onnx_import import import_onnx
    return import_onnx(path, pins)


@dataclass
class CompiledModel:
    """The result of compile_model: export it, run it here, or check it against the source runtime."""

    executable: object
    info: ModelInfo
    spec: targets.TargetSpec
    report: dict = field(default_factory=dict)
    _source_bytes: bytes | None = None

    def metadata(self) -> dict:
        return {
            "shrinkc_version": artifact.VERSION,
            "model": {"source": self.info.source, "path": self.info.path, "notes": self.info.notes},
            "inputs": [t.__dict__ for t in self.info.inputs],
            "outputs": [t.__dict__ for t in self.info.outputs],
            "target": self.spec.to_json(),
            "vm": self.report.get("vm", "bytecode"),
            "passes": self.report.get("passes", {}),
            "sparse_layers": sparse_layers(self.report.get("passes", {})),
            "runtime": artifact.runtime_needs(self.report.get("runtime_functions", []), self.spec),
        }

    def export(self, path: str, report_path: str | None = None) -> tuple[str, str]:
        so, meta = artifact.write(self.executable, self.metadata(), path, self.spec)
        if report_path:
            import json
            with open(report_path, "w") as f:
                json.dump({**self.metadata(), "timings_s": self.report.get("timings_s", {}),
                           "kernels": self.report.get("kernels", [])}, f, indent=1, default=str)
        return so, meta

    def runner(self) -> runtime.Runner:
        if not self.spec.runs_here():
            why = " (no CUDA GPU found)" if self.spec.is_gpu else ""
            raise ShrinkcError(f"a '{self.spec.name}' library cannot run on this machine{why}",
                               "export it and " + self.spec.run_hint())
        return runtime.Runner(self.executable, self.metadata())

    def run(self, inputs: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        return self.runner().run(inputs or runtime.random_inputs(self.metadata()["inputs"]))

    def verify(self, inputs: dict[str, np.ndarray] | None = None,
               tolerance: float = verify.DEFAULT_TOLERANCE) -> list[verify.Comparison]:
        inputs = inputs or runtime.random_inputs(self.metadata()["inputs"])
        ours = self.run(inputs)
        source = self._source_bytes if self._source_bytes is not None else self.info.path
        refs = verify.reference_outputs(self.info.source, source, inputs)
        names = [t.name for t in self.info.outputs]
        ours, refs = verify.counted_rows(names, list(ours), list(refs), self.info.counted_by)
        return verify.compare(names, ours, refs, max(tolerance, self.info.verify_tolerance))


SPARSE_PASSES = ("SparsifyConv1x1", "SparsifyDense")   # the passes whose "sparse" changes are sparse layers


def sparse_layers(passes: dict) -> list[dict]:
    """Every layer that runs as a sparse kernel (1x1 convs, then fully connected layers): name, share of
    zeros, block shape (output channels x 1 input channel; 1x1 for fully connected), block fill, kernel,
    and its speed-up over our dense kernel as measured by the cost interface (None where nothing was
    measured: the target does not run here). Layers whose sparse rewrite was undone (the whole model was
    not faster) are not listed: they run dense. An expand conv fused with its depthwise conv names the
    fused kernel, a 1x1 rebuilt to read or write padded planes the rebuilt one (the speed-up is the 1x1 kernel's
    alone, as SparsifyConv1x1 measured it), a kernel rebuilt with tuned knobs its new name."""
    regions = passes.get("FormCHWRegions", {}).get("changes", [])
    regions_map = {c["replaces"]: c["kernel"] for c in regions if c["what"] == "padded_planes"}
    regions_map.update({c["expand"]: c["kernel"] for c in regions if c["what"] == "fused"})  # fused: what runs
    # each later pass renames the kernels the one before it left (passes that rebuild kernels, in pipeline order)
    steps = [regions_map,
             {c["replaces"]: c["kernel"] for c in passes.get("PadChannelPlanes", {}).get("changes", [])},
             {c["layer"]: c["kernel"] for c in passes.get("ApplySchedules", {}).get("changes", [])
              if c["what"] == "retuned"}]                                             # rebuilt with tuned knobs

    def now(kernel: str) -> str:
        for step in steps:
            kernel = step.get(kernel, kernel)
        return kernel
    return [{"layer": c["layer"], "sparsity": c["zeros"], "block": f"{c['block']}x1", "block_fill": c["block_fill"],
             "kernel": now(c["kernel"]), "speedup_vs_dense": c["speedup"]}
            for name in SPARSE_PASSES for c in passes.get(name, {}).get("changes", []) if c["what"] == "sparse"]


def compile_model(model, target=None, *, inputs: dict | None = None, cc: str | None = None,
                  tuning_db: str | None = None, profiling: bool = False, **options) -> CompiledModel:
    """Compile an ONNX/TFLite model (path or onnx.ModelProto) for `target` (name, JSON dict or None = host).

    profiling: build a library whose Runner.profile times each kernel (artifact.vm_mode; it runs a little
    slower, interpreted).
    options: the fields of compiler.pipeline.Options (shrink, sparse, sparse_min, max_drop, ...)."""
    import onnx
    spec = targets.resolve(target, cc)
    artifact.check_toolchain(spec)
    opts = pipeline.Options(**options)
    timings = {}
    t0 = time.perf_counter()
    mod, info = import_model(model, inputs)
    timings["import"] = round(time.perf_counter() - t0, 3)
    if tuning_db:
        from compiler import tune
        opts.knobs = tune.knobs_from_db(tuning_db, spec)
    mod, passes, phase_times = pipeline.run(mod, spec, opts)
    timings.update(phase_times)
    t0 = time.perf_counter()
    try:
        executable = artifact.build(mod, spec, profiling)
    except ShrinkcError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
        raise ShrinkcError(f"building for '{spec.name}' failed: {first}",
                           "run with --debug and report the model and target") from None
    timings["build"] = round(time.perf_counter() - t0, 3)
    kernels = sorted({gv.name_hint for gv, f in mod.functions.items() if gv.name_hint.startswith(("f32_", "u8i8_"))})
    source_bytes = model.SerializeToString() if isinstance(model, onnx.ModelProto) else None
    return CompiledModel(executable, info, spec, {"passes": passes, "timings_s": timings, "kernels": kernels,
                                                  "vm": artifact.vm_mode(spec, profiling),
                                                  "runtime_functions": artifact.runtime_functions(mod)}, source_bytes)


def load(path: str) -> runtime.Runner:
    """Load an exported OUT.so (OUT.json beside it) for running on this machine."""
    return runtime.load(path)
