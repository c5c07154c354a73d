"""Real exporters' output through shrinkc: torchvision models via torch.onnx, Keras applications via
the TFLite converter (random weights: the graphs are what matters), each compiled with --verify.

    python tools/real_exports.py export --out DIR     # needs torch, torchvision, tensorflow-cpu (not in
                                                       # shrinkc's extras: use a separate venv)
    python tools/real_exports.py export --out DIR --only keras-sparse     # tensorflow-cpu only
    python tools/real_exports.py prune DIR            # shrinkc's venv: torch_*_pruned85.onnx from DIR's exports
    python tools/real_exports.py prune DIR --names convnext_tiny conv_vit   # ... of other exports
    python tools/real_exports.py quantize DIR         # shrinkc's venv: torch_*_qdq.onnx from DIR's exports
    python tools/real_exports.py check DIR            # shrinkc's venv: compile --verify each model
    python tools/real_exports.py check DIR --time 10  # ... and time each library against the exporter's runtime

`keras-sparse`: Keras MobileNetV2 / MobileNetV3-Small with 85% of every 1x1 conv's and dense layer's
weights zeroed (unstructured), converted with the converter's own sparse encoding
(tf.lite.Optimize.EXPERIMENTAL_SPARSITY: SparsityParameters + DENSIFY), fp32, fp16 and dynamic-range (`_dr`).
`keras-quantized`: Keras MobileNetV2 / MobileNetV3-Small / EfficientNet-B0 through the converter's quantization:
dynamic-range (`_dr`: tf.lite.Optimize.DEFAULT alone, int8 weights, float activations) and integer (`_int8`:
with a representative dataset of random images, int8 weights and activations, float input and output).
`quantize`: the torch.onnx MobileNetV2 / V3-Large / EfficientNet-B0 exports through ONNX Runtime's static
quantization (QDQ, int8 per-channel weights, int8 activations calibrated on random images; `_u8w`: uint8 weights with
one zero point per tensor: weight_type QUInt8, per_channel False).
`torch-seg`: torchvision's segmentation models on MobileNetV3-Large (LR-ASPP, DeepLabV3: dilated convs, bilinear
Resize to the input size, 21 classes), their `out` map as the output.
`torch-unet`: a U-Net-style segmentation network (random weights) whose decoder upsamples with ConvTranspose2d
(k4 s2 p1 three times, then k2 s2 twice: 7x7 to 224x224) and concatenates the skips of torchvision's MobileNetV2
features (strides 4, 8, 16), as segmentation and matting models on phones are built.
`torch-yolo`: a YOLOv8n-style detector (random weights, 320x320 static input): C2f blocks that split their
channels in halves, SPPF's chained 5x5 max pools, a nearest-upsampling FPN / PAN neck and three 1x1 heads whose
flattened maps are concatenated, SiLU throughout.
`torch-convnext`: torchvision's ConvNeXt-T (7x7 depthwise convs, then LayerNorm and two Linear layers with a GELU
on channel-last tensors).
`torch-face`: a MobileFaceNet-style face embedder (random weights, 112x112): depthwise-separable bottlenecks with
PReLU after every conv but the projections, a 7x7 global depthwise conv and a 128-wide embedding.
`torch-vit`: a small hybrid of a conv stem and two transformer blocks (random weights, 224x224 -> 784 tokens of 96:
LayerNorm, 4-head attention through torch's MultiheadAttention, a SiLU MLP), as mobile ViT hybrids are built.
`tf1-uint8`: a MobileNetV1 quantized as TF1 wrote it (zoo.tflite_writer.uint8_mobilenet_v1_tflite), with and
without its uint8 softmax.
`torch-fp16`: torchvision MobileNetV2 / EfficientNet-B0 exported in half precision (`.half()`: float16 weights,
input and output), as exported for GPUs or to halve a file.
`prune`: the torch.onnx MobileNetV2 / V3-Large / EfficientNet-B0 / MnasNet exports with the 85% smallest
weights of every 1x1 conv (not depthwise) and of the classifier set to zero, stored dense, as a magnitude-pruning
tool leaves them (its squeeze-and-excite convs included).
`check` writes benchmarks/REAL-EXPORTS.md: model, result line, sparse layers, library size, compile seconds;
with `--time R`, also shrinkc's and the reference runtime's median ms at 1 thread (ONNX Runtime for .onnx,
LiteRT for .tflite; each in its own process, R rounds of bursts of 5 runs alternating, tools/benchlib.py).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHVISION = ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0", "mnasnet1_0",
               "shufflenet_v2_x1_0", "resnet18", "squeezenet1_1", "regnet_x_400mf"]
TORCHVISION_MORE = ["regnet_y_400mf", "efficientnet_v2_s", "mnasnet0_5", "densenet121", "googlenet"]   # --only torch-more
CONVNEXT = ["convnext_tiny"]   # --only torch-convnext: LayerNorm and Linear layers on channel-last tensors, GELU
KERAS = {"mobilenet_v1": "MobileNet", "mobilenet_v2": "MobileNetV2", "mobilenet_v3_small": "MobileNetV3Small",
         "mobilenet_v3_large": "MobileNetV3Large", "efficientnet_b0": "EfficientNetB0"}


def export(out: str, only: str | None = None) -> None:
    """Every group of GROUPS (in its order) into `out`, or the group `only`."""
    os.makedirs(out, exist_ok=True)
    for group, write in GROUPS.items():
        if only in (None, group):
            write(out)


def _export_torch(out: str, names: list[str] = TORCHVISION, dynamo: bool = True) -> None:
    """torch_NAME.onnx through torch.onnx (batch axis dynamic); with dynamo, also the dynamo exporter's MobileNetV2."""
    import torch
    import torchvision
    torch.manual_seed(0)
    for name in names:
        m = _torchvision_model(name)
        torch.onnx.export(m, torch.randn(1, 3, 224, 224), f"{out}/torch_{name}.onnx", opset_version=13,
                          dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    if not dynamo:
        return
    m = torchvision.models.mobilenet_v2(weights=None).eval()
    torch.onnx.export(m, (torch.randn(1, 3, 224, 224),), f"{out}/torchdynamo_mobilenet_v2.onnx", dynamo=True)


def _torchvision_model(name: str):
    import torchvision
    return _random_statistics(getattr(torchvision.models, name)(weights=None).eval())


def _random_statistics(m):
    """m with BN statistics that are not the identity, so folding is exercised, and PReLU slopes in [0.05, 0.4]
    (drawn in module order)."""
    import torch
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
        if isinstance(mod, torch.nn.PReLU):
            mod.weight.data.uniform_(0.05, 0.4)
    return m


SEGMENTATION = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"]   # --only torch-seg


def _export_torch_seg(out: str) -> None:
    """torch_NAME.onnx for torchvision's segmentation models: the `out` map of their output dict."""
    import torch
    import torchvision

    class OutMap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)["out"]
    torch.manual_seed(0)
    for name in SEGMENTATION:
        m = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=21)
        torch.onnx.export(OutMap(m.eval()), torch.randn(1, 3, 224, 224), f"{out}/torch_{name}.onnx", opset_version=13,
                          dynamo=False, input_names=["input"], output_names=["out"])


def _export_torch_unet(out: str) -> None:
    """torch_unet_mobilenet_v2.onnx: MobileNetV2 features, a ConvTranspose2d decoder with skips, 2 classes."""
    import torch
    from torch import nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            f = _torchvision_model("mobilenet_v2").features
            self.enc = nn.ModuleList([f[:4], f[4:7], f[7:14], f[14:18]])      # 24 @56, 32 @28, 96 @14, 320 @7
            self.up = nn.ModuleList([nn.ConvTranspose2d(320, 96, 4, 2, 1), nn.ConvTranspose2d(96, 32, 4, 2, 1),
                                     nn.ConvTranspose2d(32, 24, 4, 2, 1)])
            self.dec = nn.ModuleList([block(192, 96), block(64, 32), block(48, 24)])
            self.head = nn.Sequential(nn.ConvTranspose2d(24, 16, 2, 2), nn.ReLU(inplace=True),
                                      nn.ConvTranspose2d(16, 2, 2, 2))

        def forward(self, x):
            skips = []
            for stage in self.enc:
                x = stage(x)
                skips.append(x)
            x = skips.pop()
            for up, dec in zip(self.up, self.dec):
                x = dec(torch.cat([up(x), skips.pop()], 1))
            return self.head(x)
    torch.manual_seed(0)
    m = _random_statistics(UNet().eval())
    torch.onnx.export(m, torch.randn(1, 3, 224, 224), f"{out}/torch_unet_mobilenet_v2.onnx", opset_version=13,
                      dynamo=False, input_names=["input"], output_names=["mask"])


def _export_torch_yolo(out: str) -> None:
    """torch_yolo_c2f.onnx: a YOLOv8n-style backbone, neck and heads at 320x320 (84 = 4 box + 80 class maps)."""
    import torch
    from torch import nn

    def cbs(ci, co, k=1, s=1):
        return nn.Sequential(nn.Conv2d(ci, co, k, s, k // 2, bias=False), nn.BatchNorm2d(co), nn.SiLU())

    class C2f(nn.Module):
        def __init__(self, ci, co, n=1):
            super().__init__()
            c = co // 2
            self.cv1, self.cv2 = cbs(ci, 2 * c), cbs((2 + n) * c, co)
            self.m = nn.ModuleList(nn.Sequential(cbs(c, c, 3), cbs(c, c, 3)) for _ in range(n))

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))
            for m in self.m:
                y.append(y[-1] + m(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class SPPF(nn.Module):
        def __init__(self, ci, co):
            super().__init__()
            self.cv1, self.cv2, self.m = cbs(ci, ci // 2), cbs(ci * 2, co), nn.MaxPool2d(5, 1, 2)

        def forward(self, x):
            x = self.cv1(x)
            y1 = self.m(x)
            y2 = self.m(y1)
            return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.ModuleList([cbs(3, 16, 3, 2), cbs(16, 32, 3, 2), C2f(32, 32), cbs(32, 64, 3, 2),
                                           C2f(64, 64, 2), cbs(64, 128, 3, 2), C2f(128, 128, 2), cbs(128, 256, 3, 2),
                                           C2f(256, 256), SPPF(256, 256)])
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.top_down = nn.ModuleList([C2f(384, 128), C2f(192, 64)])
            self.down = nn.ModuleList([cbs(64, 64, 3, 2), cbs(128, 128, 3, 2)])
            self.bottom_up = nn.ModuleList([C2f(192, 128), C2f(384, 256)])
            self.heads = nn.ModuleList([nn.Conv2d(c, 84, 1) for c in (64, 128, 256)])

        def forward(self, x):
            taps = []
            for i, m in enumerate(self.backbone):
                x = m(x)
                if i in (4, 6):
                    taps.append(x)
            p4 = self.top_down[0](torch.cat([self.up(x), taps[1]], 1))
            p3 = self.top_down[1](torch.cat([self.up(p4), taps[0]], 1))
            n4 = self.bottom_up[0](torch.cat([self.down[0](p3), p4], 1))
            n5 = self.bottom_up[1](torch.cat([self.down[1](n4), x], 1))
            return torch.cat([h(t).flatten(2) for h, t in zip(self.heads, (p3, n4, n5))], 2)
    torch.manual_seed(0)
    m = _random_statistics(Detector().eval())
    torch.onnx.export(m, torch.randn(1, 3, 320, 320), f"{out}/torch_yolo_c2f.onnx", opset_version=13, dynamo=False,
                      input_names=["images"], output_names=["boxes_and_scores"])


def _export_torch_face(out: str) -> None:
    """torch_mobilefacenet_prelu.onnx: MobileFaceNet-style bottlenecks with PReLU, 112x112 -> 128 floats."""
    import torch
    from torch import nn

    def cbp(ci, co, s=1, g=1, k=3):
        return nn.Sequential(nn.Conv2d(ci, co, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(co), nn.PReLU(co))

    class Bottleneck(nn.Module):
        def __init__(self, c, e=2):
            super().__init__()
            self.b = nn.Sequential(cbp(c, c * e, k=1), cbp(c * e, c * e, g=c * e), nn.Conv2d(c * e, c, 1, bias=False),
                                   nn.BatchNorm2d(c))

        def forward(self, x):
            return x + self.b(x)
    torch.manual_seed(0)
    m = nn.Sequential(cbp(3, 64, 2), cbp(64, 64, g=64), cbp(64, 128, 2, k=1), Bottleneck(128), Bottleneck(128),
                      cbp(128, 128, 2, g=128), cbp(128, 128, k=1), Bottleneck(128), Bottleneck(128),
                      cbp(128, 256, 2, k=1), Bottleneck(256), cbp(256, 512, k=1),
                      nn.Conv2d(512, 512, 7, groups=512, bias=False), nn.Flatten(), nn.Linear(512, 128)).eval()
    _random_statistics(m)
    torch.onnx.export(m, torch.randn(1, 3, 112, 112), f"{out}/torch_mobilefacenet_prelu.onnx", opset_version=13,
                      dynamo=False, input_names=["input"], output_names=["embedding"])


def _export_torch_vit(out: str) -> None:
    """torch_conv_vit.onnx: a conv stem to 28x28x96, two pre-norm transformer blocks on its 784 tokens, 10 logits."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d=96, heads=4):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.att = nn.MultiheadAttention(d, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))

        def forward(self, x):
            y = self.ln1(x)
            x = x + self.att(y, y, y, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))

    class ConvViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.SiLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.SiLU(),
                                      nn.Conv2d(64, 96, 3, 2, 1), nn.SiLU())
            self.blocks = nn.Sequential(Block(), Block())
            self.head = nn.Linear(96, 10)

        def forward(self, x):
            tokens = self.stem(x).flatten(2).transpose(1, 2)
            return self.head(self.blocks(tokens).mean(1))
    torch.manual_seed(0)
    torch.onnx.export(ConvViT().eval(), torch.randn(1, 3, 224, 224), f"{out}/torch_conv_vit.onnx", opset_version=17,
                      dynamo=False, input_names=["input"], output_names=["logits"])


FP16 = ["mobilenet_v2", "efficientnet_b0"]


def _export_torch_fp16(out: str) -> None:
    """torch_NAME_fp16.onnx: the model in half precision (`.half()`), float16 weights, input and output."""
    import torch
    torch.manual_seed(0)
    for name in FP16:
        m = _torchvision_model(name).half()
        torch.onnx.export(m, torch.randn(1, 3, 224, 224).half(), f"{out}/torch_{name}_fp16.onnx", opset_version=13,
                          dynamo=False, input_names=["input"], output_names=["logits"])


def _keras_model(name: str):
    import tensorflow as tf
    return getattr(tf.keras.applications, KERAS[name])(weights=None, input_shape=(224, 224, 3),
                                                        classifier_activation=None)


def _write_tflite(model, stem: str, sparse: bool = False, variants: tuple = ("", "_fp16")) -> None:
    """STEM.tflite (fp32), STEM_fp16.tflite, STEM_dr.tflite (dynamic-range) and STEM_int8.tflite (integer, calibrated
    on random images) through the TFLite converter, those `variants` named; with sparse, its own sparse encoding of
    mostly-zero weights (EXPERIMENTAL_SPARSITY)."""
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(0)

    def images():
        for _ in range(8):
            yield [rng.uniform(-1, 1, (1, *model.input_shape[1:])).astype(np.float32)]

    for suffix in variants:
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY] * sparse + [tf.lite.Optimize.DEFAULT] * bool(suffix)
        if optimizations:
            conv.optimizations = optimizations
        if suffix == "_fp16":
            conv.target_spec.supported_types = [tf.float16]
        if suffix == "_int8":
            conv.representative_dataset = images
        with open(f"{stem}{suffix}.tflite", "wb") as f:
            f.write(conv.convert())


def _export_keras(out: str) -> None:
    import tensorflow as tf
    tf.random.set_seed(0)
    for name in KERAS:
        _write_tflite(_keras_model(name), f"{out}/keras_{name}")


def _randomised(model, rng, zeros: float = 0.0):
    """The model with BN statistics that fold to something, and with `zeros` of every 1x1 conv's and dense layer's
    weights zero (unstructured)."""
    import numpy as np
    import tensorflow as tf
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            weights[2] = rng.uniform(-0.1, 0.1, weights[2].shape).astype(np.float32)
            weights[3] = rng.uniform(0.5, 1.5, weights[3].shape).astype(np.float32)
        elif zeros and (isinstance(layer, tf.keras.layers.Dense) or (type(layer) is tf.keras.layers.Conv2D
                                                                   and tuple(layer.kernel_size) == (1, 1))):
            weights[0] = weights[0] * (rng.random(weights[0].shape) >= zeros)
        else:
            continue
        layer.set_weights(weights)
    return model


def _export_keras_sparse(out: str, zeros: float = 0.85) -> None:
    import numpy as np
    import tensorflow as tf
    tf.random.set_seed(0)
    rng = np.random.default_rng(0)
    for name in ("mobilenet_v2", "mobilenet_v3_small"):
        model = _randomised(_keras_model(name), rng, zeros)
        _write_tflite(model, f"{out}/keras_{name}_sparse{round(zeros * 100)}", sparse=True,
                      variants=("", "_fp16", "_dr"))


QUANTIZED = ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0"]


def _export_keras_quantized(out: str) -> None:
    import numpy as np
    import tensorflow as tf
    tf.random.set_seed(0)
    rng = np.random.default_rng(0)
    for name in QUANTIZED:
        _write_tflite(_randomised(_keras_model(name), rng), f"{out}/keras_{name}", variants=("_dr", "_int8"))


PRUNED = ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0"]


def prune(folder: str, zeros: float = 0.85, names: list[str] = PRUNED) -> None:
    """torch_NAME_pruned85.onnx: DIR's torch_NAME.onnx with the smallest 85% of every 1x1 conv's, Gemm's and
    constant 2-D MatMul operand's weights zero (magnitude pruning, stored dense)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    for name in names:
        model = onnx.load(os.path.join(folder, f"torch_{name}.onnx"))
        inits = {i.name: i for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type not in ("Conv", "Gemm", "MatMul") or node.input[1] not in inits:
                continue
            w = numpy_helper.to_array(inits[node.input[1]]).copy()
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if (w.shape[2:] != (1, 1) or group != 1) if node.op_type == "Conv" else w.ndim != 2:
                continue
            flat = w.reshape(-1)
            flat[np.argsort(np.abs(flat), kind="stable")[:round(zeros * flat.size)]] = 0
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
        onnx.save(model, os.path.join(folder, f"torch_{name}_pruned{round(zeros * 100)}.onnx"))


QDQ = ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"]


def quantize(folder: str, names: list[str] = QDQ) -> None:
    """torch_NAME_qdq.onnx: ONNX Runtime's static quantization of DIR's torch_NAME.onnx (QDQ, int8 per-channel
    weights, int8 activations calibrated on 8 random images); torch_NAME_dyn.onnx: its dynamic quantization
    (quantize_dynamic's defaults: int8 weights, uint8 activations quantized at run time, ConvInteger);
    torch_NAME_qop.onnx: static quantization in the QOperator format (QLinearConv, com.microsoft QLinear* ops;
    uint8 activations, int8 per-channel weights, 8 random images), skipped where ONNX Runtime's quantizer fails;
    torch_NAME_u8w.onnx: QDQ with uint8 activations and asymmetric uint8 weights, one scale per tensor (QUInt8,
    per_channel False), 8 random images."""
    import numpy as np
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic
    sys.path.insert(0, ROOT)
    from zoo.quantize_qdq import quantize_qdq
    # the QDQ files as before the _qop ones, and those as before the _u8w ones
    rng, qop_rng, u8w_rng = np.random.default_rng(0), np.random.default_rng(1), np.random.default_rng(2)
    for name in names:
        src = os.path.join(folder, f"torch_{name}.onnx")
        quantize_qdq(src, os.path.join(folder, f"torch_{name}_qdq.onnx"), (1, 3, 224, 224), 8, rng)
        quantize_dynamic(src, os.path.join(folder, f"torch_{name}_dyn.onnx"))
        try:
            quantize_qdq(src, os.path.join(folder, f"torch_{name}_qop.onnx"), (1, 3, 224, 224), 8, qop_rng,
                         quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8)
        except Exception as err:      # ONNX Runtime's own quantizer (EfficientNet-B0: a missing initializer)
            print(f"torch_{name}_qop.onnx: skipped, ONNX Runtime's quantizer failed: {type(err).__name__}: {err}")
        quantize_qdq(src, os.path.join(folder, f"torch_{name}_u8w.onnx"), (1, 3, 224, 224), 8, u8w_rng,
                     activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8, per_channel=False)


def _time(path: str, lib: str, rounds: int) -> tuple[float, float]:
    """Median ms of the library and of the reference runtime on the same random input, at 1 thread."""
    import numpy as np
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    sys.path.insert(0, ROOT)
    import benchlib
    from compiler import runtime
    inputs = runtime.random_inputs(runtime.read_metadata(lib)["inputs"], seed=0)
    if path.endswith(".tflite"):     # the same array under LiteRT's name for the input
        from ai_edge_litert.interpreter import Interpreter
        (only,) = inputs.values()
        inputs.update({d["name"]: only for d in Interpreter(model_path=path).get_input_details()})
    npz = os.path.splitext(lib)[0] + "_inputs.npz"
    np.savez(npz, **inputs)
    ref = "litert" if path.endswith(".tflite") else "onnxruntime"
    times = benchlib.alternate_runtimes({"shrinkc": ("shrinkc", lib), "ref": (ref, path)}, npz, 1, rounds)
    return tuple(benchlib.stats(times[k])["median_ms"] for k in ("shrinkc", "ref"))


def check(folder: str, out_md: str, rounds: int = 0) -> int:
    rows, failed = [], 0
    for path in sorted(glob.glob(os.path.join(folder, "*.onnx")) + glob.glob(os.path.join(folder, "*.tflite"))):
        info = subprocess.run([sys.executable, "-m", "compiler.cli", "inspect", path], capture_output=True,
                              text=True, cwd=ROOT).stdout
        name, dims = next(line.split()[1:3] for line in info.splitlines() if line.startswith("  input"))
        # a dynamic input (a batch axis) is pinned at 224x224; a static one is served as the model fixes it
        shape = "1x224x224x3" if path.endswith(".tflite") else "1x3x224x224"
        pin = ["--input", f"{name.rstrip(':')}:{shape}"] if not all(d.isdigit() for d in dims.split("x")) else []
        t0 = time.perf_counter()
        lib, report = os.path.join(folder, "out.so"), os.path.join(folder, "out.json")
        for stale in (lib, report):
            if os.path.exists(stale):
                os.remove(stale)
        r = subprocess.run([sys.executable, "-m", "compiler.cli", "compile", path, "-o", lib, "--verify",
                            "--report", report, *pin], capture_output=True, text=True, cwd=ROOT)
        lines = [x for x in (r.stdout + r.stderr).splitlines() if x.startswith(("verify", "shrinkc:"))]
        failed += r.returncode != 0 or not any("-> ok" in x for x in lines)
        sparse, size, timed = "", "", ""
        if r.returncode == 0:
            with open(report) as f:
                sparse = str(len(json.load(f)["sparse_layers"]))
            size = f"{os.path.getsize(lib) / 1e6:.2f}"
        seconds = time.perf_counter() - t0
        if r.returncode == 0 and rounds:
            ours, ref = _time(path, lib, rounds)
            timed = f" | {ours:.2f} | {ref:.2f} | **{ref / ours:.2f}**"
        rows.append((os.path.basename(path), r.returncode, " / ".join(lines)[:240], sparse, size, seconds, timed))
        print(f"{rows[-1][0]}: rc {r.returncode} {rows[-1][2]} sparse layers {sparse}{timed}", flush=True)
    default_md = os.path.join(ROOT, "benchmarks", "REAL-EXPORTS.md")
    md_arg = "" if os.path.abspath(out_md) == default_md else f" --md {os.path.relpath(out_md, ROOT)}"
    md_arg += f" --time {rounds}" if rounds else ""
    head = " | shrinkc ms | reference ms | reference / shrinkc" if rounds else ""
    with open(out_md, "w") as f:
        f.write(f"# Real exporters' graphs through shrinkc compile --verify\n\n{datetime.date.today()}, command: "
                f"`python tools/real_exports.py check {folder}{md_arg}` (models from `tools/real_exports.py export`: "
                "torchvision via torch.onnx, Keras applications via the TFLite converter, random weights; "
                "`*_sparse85*`: 85% of the 1x1 and dense weights zero, stored by the converter's sparse encoding; "
                "`*_pruned85`: `tools/real_exports.py prune`, 85% of the 1x1 and classifier weights zero, stored dense; "
                "`*_dr` / `*_int8`: the converter's dynamic-range / integer quantization; `*_qdq` / `*_dyn` / `*_qop`: "
                "`tools/real_exports.py quantize`, ONNX Runtime's static QDQ / dynamic / static QOperator quantization)"
                + ("; timed at 1 thread against ONNX Runtime (.onnx) or LiteRT (.tflite) on the same input, each in "
                   "its own process, bursts of 5 runs alternating, medians; above 1 = shrinkc faster"
                   if rounds else "") + f"\n\n| model | exit | result | sparse layers | .so MB | compile + verify s{head} |\n"
                f"|---|---|---|---|---|---|{'---|---|---|' if rounds else ''}\n")
        for name, rc, line, sparse, size, s, timed in rows:
            f.write(f"| {name} | {rc} | {line.replace('|', '/')} | {sparse} | {size} | {s:.0f}{timed} |\n")
    return 1 if failed else 0


# export groups (`export --only GROUP`), written in this order by a plain `export`
def _export_tf1_uint8(out: str) -> None:
    """MobileNetV1 1.0 224 as TF1's quantization-aware training wrote it (uint8 everything, asymmetric per-tensor
    weights; zoo.tflite_writer, random weights), with its uint8 softmax and without it (logits as the output)."""
    sys.path.insert(0, ROOT)
    from zoo.tflite_writer import uint8_mobilenet_v1_tflite
    for suffix, softmax in (("", True), ("_logits", False)):
        path = os.path.join(out, f"tf1_mobilenet_v1_uint8{suffix}.tflite")
        with open(path, "wb") as f:
            f.write(uint8_mobilenet_v1_tflite(softmax=softmax))
        print(f"wrote {path}", flush=True)


GROUPS = {
    "torch": _export_torch,
    "torch-more": lambda out: _export_torch(out, TORCHVISION_MORE, dynamo=False),
    "torch-convnext": lambda out: _export_torch(out, CONVNEXT, dynamo=False),
    "keras": _export_keras,
    "keras-sparse": _export_keras_sparse,
    "torch-fp16": _export_torch_fp16,
    "torch-seg": _export_torch_seg,
    "torch-unet": _export_torch_unet,
    "torch-yolo": _export_torch_yolo,
    "torch-face": _export_torch_face,
    "torch-vit": _export_torch_vit,
    "keras-quantized": _export_keras_quantized,
    "tf1-uint8": _export_tf1_uint8,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--out", required=True)
    e.add_argument("--only", choices=list(GROUPS), help="one group of models")
    pr = sub.add_parser("prune")
    pr.add_argument("folder")
    pr.add_argument("--names", nargs="+", default=PRUNED, help="the torch_NAME.onnx models to prune")
    sub.add_parser("quantize").add_argument("folder")
    c = sub.add_parser("check")
    c.add_argument("folder")
    c.add_argument("--md", default=os.path.join(ROOT, "benchmarks", "REAL-EXPORTS.md"))
    c.add_argument("--time", type=int, default=0, metavar="ROUNDS",
                   help="also time each library against ONNX Runtime / LiteRT (rounds of 5-run bursts)")
    args = p.parse_args()
    if args.cmd == "export":
        export(args.out, args.only)
    elif args.cmd == "prune":
        prune(args.folder, names=args.names)
    elif args.cmd == "quantize":
        quantize(args.folder)
    else:
        os.makedirs(os.path.dirname(args.md), exist_ok=True)
        sys.exit(check(args.folder, args.md, args.time))


if __name__ == "__main__":
    main()
