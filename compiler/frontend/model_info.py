"""What a compiled model takes and returns: names, shapes and dtypes of its inputs and outputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


# --verify's relative tolerance for quantized models, whose reference cannot be matched to float rounding: LiteRT's
# hybrid kernels quantize their float inputs to int8 at run time (dynamic-range weights), and where the graph
# quantizes activations (QDQ ONNX, int8 TFLite) a different float summation order moves a few values by one int8
# step, which later layers carry on. MobileNetV2 differed by 0.5-0.8% of its output's peak either way.
QUANTIZED_VERIFY_TOLERANCE = 0.05


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
    notes: list[str] = field(default_factory=list)    # what the import decided for the user (batch 1)
    verify_tolerance: float = 0.0   # --verify allows at least this relative difference from the source runtime
    # outputs whose entries past the count another output holds are undefined in the source runtime (an SSD
    # detector's boxes, classes and scores past its number of detections): output name -> count output name
    counted_by: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "ModelInfo":
        return ModelInfo(source=d["source"], path=d["path"],
                         inputs=[TensorInfo(**t) for t in d["inputs"]],
                         outputs=[TensorInfo(**t) for t in d["outputs"]], notes=d.get("notes", []),
                         verify_tolerance=d.get("verify_tolerance", 0.0), counted_by=d.get("counted_by", {}))


def batch_one(name: str, dims: list) -> tuple[list, str | None]:
    """A free leading (batch) axis whose other axes are all fixed becomes 1, as exporters leave it free
    (Keras via the TFLite converter always, torch.onnx with dynamic_axes) and a mobile model runs batch 1;
    also the note that says so. Anything else comes back as it was."""
    if len(dims) < 2 or isinstance(dims[0], int) or not all(isinstance(d, int) for d in dims[1:]):
        return dims, None
    other = "x".join(map(str, [8] + list(dims[1:])))
    return [1] + list(dims[1:]), (f"input '{name}': its dynamic batch axis is compiled as 1 (another size: "
                                  f"--input {name}:{other})")
