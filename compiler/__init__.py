"""shrinkc: compile mobile CNNs (ONNX, TFLite) into small, fast TVM libraries."""
from compiler.driver import CompiledModel, compile_model, load
from targets.errors import ShrinkcError

__all__ = ["compile_model", "load", "CompiledModel", "ShrinkcError"]
