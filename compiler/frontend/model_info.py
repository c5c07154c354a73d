"""What a compiled model takes and returns: names, shapes and dtypes of its inputs and outputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str = "float32"


@dataclass
class ModelInfo:
    """The signature of a model and where it came from ("onnx" or "tflite")."""

    source: str
    path: str
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "ModelInfo":
        return ModelInfo(source=d["source"], path=d["path"],
                         inputs=[TensorInfo(**t) for t in d["inputs"]],
                         outputs=[TensorInfo(**t) for t in d["outputs"]])
