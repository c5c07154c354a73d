"""Run the source model in ONNX Runtime (ONNX) or LiteRT (TFLite) on the same input and compare."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from targets.errors import ShrinkcError

DEFAULT_TOLERANCE = 1e-3   # max |ours - ref| / max |ref|, per output


@dataclass
class Comparison:
    output: str
    max_abs_err: float
    rel_err: float
    where: tuple
    ours: float
    ref: float
    ok: bool
    shapes: tuple = ()     # (ours, reference) where the two outputs' shapes differ

    def line(self) -> str:
        if self.shapes:
            return f"{self.output}: shape {list(self.shapes[0])} vs reference {list(self.shapes[1])} -> MISMATCH"
        return (f"{self.output}: max abs err {self.max_abs_err:.3g} (relative {self.rel_err:.3g}) at {list(self.where)}: "
                f"ours {self.ours:.6g} vs reference {self.ref:.6g} -> {'ok' if self.ok else 'MISMATCH'}")


def reference_outputs(source: str, path: str, inputs: dict[str, np.ndarray], threads: int = 1) -> list[np.ndarray]:
    """Outputs of the source model in its own runtime."""
    if source == "onnx":
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return sess.run(None, inputs)
    if source == "tflite":
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
        try:
            return _litert_outputs(Interpreter(model_path=path, num_threads=threads), inputs)
        except RuntimeError:   # NOTE: the XNNPACK delegate fails on some valid models ("failed to delegate":
            pass               # sparse-stored int8 weights of dynamic-range quantization); LiteRT's kernels run them
        try:
            return _litert_outputs(Interpreter(model_path=path, num_threads=threads, experimental_op_resolver_type=
                                               OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES), inputs)
        except RuntimeError as err:
            custom = re.search(r"unresolved custom op: ([^.\s]+)", str(err))
            if not custom:
                raise
            raise ShrinkcError(f"LiteRT cannot run the custom op '{custom.group(1)}' of the model, so --verify has no "
                               "reference to compare with", "compile without --verify (shrinkc's tests check the "
                               "op against numpy written from its kernel)") from None
    raise ShrinkcError(f"cannot verify a model from '{source}'", "verify supports ONNX and TFLite models")


def _litert_outputs(interp, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    interp.allocate_tensors()
    by_name = {d["name"]: d for d in interp.get_input_details()}
    for name, value in inputs.items():
        d = by_name[name]
        if list(d["shape"]) != list(value.shape):
            interp.resize_tensor_input(d["index"], list(value.shape))
            interp.allocate_tensors()
        interp.set_tensor(d["index"], value)
    interp.invoke()
    return [interp.get_tensor(d["index"]) for d in interp.get_output_details()]


def counted_rows(names: list[str], ours: list, refs: list, counted_by: dict[str, str]) -> tuple[list, list]:
    """Both sides' outputs with those in `counted_by` cut to the rows the reference's count output names (the rest
    is undefined there)."""
    for name, count in counted_by.items():
        if name in names and count in names:
            n = int(np.asarray(refs[names.index(count)]).ravel()[0])
            i = names.index(name)
            ours[i], refs[i] = np.asarray(ours[i])[:, :n], np.asarray(refs[i])[:, :n]
    return ours, refs


def compare(names: list[str], ours: list[np.ndarray], refs: list[np.ndarray],
            tolerance: float = DEFAULT_TOLERANCE) -> list[Comparison]:
    results = []
    for name, a, b in zip(names, ours, refs):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64).reshape(a.shape) if np.asarray(b).size == a.size else np.asarray(b, np.float64)
        if a.shape != b.shape:
            results.append(Comparison(name, float("inf"), float("inf"), (), float("nan"), float("nan"), False,
                                      (a.shape, b.shape)))
            continue
        diff = np.abs(a - b)
        idx = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
        # NOTE: relative to the output's own magnitude, however small (a 1e-6 floor let wrong outputs of
        # 1e-11, as untrained Keras models give, pass); an all-zero reference is compared absolutely
        peak = float(np.max(np.abs(b))) if b.size else 0.0
        scale = peak if peak > 1e-30 else 1.0
        err = float(diff[idx]) if diff.size else 0.0
        results.append(Comparison(name, err, err / scale, tuple(int(i) for i in idx),
                                  float(a[idx]) if diff.size else 0.0, float(b[idx]) if diff.size else 0.0,
                                  bool(err / scale <= tolerance and np.all(np.isfinite(a)))))
    return results
