"""Real exporters' output through shrinkc: torchvision models via torch.onnx, Keras applications via
the TFLite converter (random weights: the graphs are what matters), each compiled with --verify.

    python tools/real_exports.py export --out DIR     # needs torch, torchvision, tensorflow-cpu (not in
                                                       # shrinkc's extras: use a separate venv)
    python tools/real_exports.py check DIR            # shrinkc's venv: compile --verify each model

`check` writes benchmarks/REAL-EXPORTS.md: model, exporter, result line, compile seconds.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHVISION = ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0", "mnasnet1_0",
               "shufflenet_v2_x1_0", "resnet18", "squeezenet1_1", "regnet_x_400mf"]
KERAS = {"mobilenet_v1": "MobileNet", "mobilenet_v2": "MobileNetV2", "mobilenet_v3_small": "MobileNetV3Small",
         "mobilenet_v3_large": "MobileNetV3Large", "efficientnet_b0": "EfficientNetB0"}


def export(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    import torch
    import torchvision
    torch.manual_seed(0)
    for name in TORCHVISION:
        m = getattr(torchvision.models, name)(weights=None).eval()
        for mod in m.modules():   # BN statistics that are not the identity, so folding is exercised
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
        torch.onnx.export(m, torch.randn(1, 3, 224, 224), f"{out}/torch_{name}.onnx", opset_version=13,
                          dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    m = torchvision.models.mobilenet_v2(weights=None).eval()
    torch.onnx.export(m, (torch.randn(1, 3, 224, 224),), f"{out}/torchdynamo_mobilenet_v2.onnx", dynamo=True)
    import tensorflow as tf
    tf.random.set_seed(0)
    for name, cls in KERAS.items():
        model = getattr(tf.keras.applications, cls)(weights=None, input_shape=(224, 224, 3),
                                                    classifier_activation=None)
        for suffix, fp16 in (("", False), ("_fp16", True)):
            conv = tf.lite.TFLiteConverter.from_keras_model(model)
            if fp16:
                conv.optimizations = [tf.lite.Optimize.DEFAULT]
                conv.target_spec.supported_types = [tf.float16]
            with open(f"{out}/keras_{name}{suffix}.tflite", "wb") as f:
                f.write(conv.convert())


def check(folder: str, out_md: str) -> int:
    rows, failed = [], 0
    for path in sorted(glob.glob(os.path.join(folder, "*.onnx")) + glob.glob(os.path.join(folder, "*.tflite"))):
        info = subprocess.run([sys.executable, "-m", "compiler.cli", "inspect", path], capture_output=True,
                              text=True, cwd=ROOT).stdout
        name = next(line.split()[1].rstrip(":") for line in info.splitlines() if line.startswith("  input"))
        shape = "1x224x224x3" if path.endswith(".tflite") else "1x3x224x224"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "compiler.cli", "compile", path, "-o",
                            os.path.join(folder, "out.so"), "--verify", "--input", f"{name}:{shape}"],
                           capture_output=True, text=True, cwd=ROOT)
        lines = [x for x in (r.stdout + r.stderr).splitlines() if x.startswith(("verify", "shrinkc:"))]
        failed += r.returncode != 0 or not any("-> ok" in x for x in lines)
        rows.append((os.path.basename(path), r.returncode, " / ".join(lines)[:240], time.perf_counter() - t0))
        print(f"{rows[-1][0]}: rc {r.returncode} {rows[-1][2]}", flush=True)
    with open(out_md, "w") as f:
        f.write(f"# Real exporters' graphs through shrinkc compile --verify\n\n{datetime.date.today()}, command: "
                f"`python tools/real_exports.py check {folder}` (models from `tools/real_exports.py export`: "
                "torchvision via torch.onnx, Keras applications via the TFLite converter, random weights)\n\n"
                "| model | exit | result | compile + verify s |\n|---|---|---|---|\n")
        for name, rc, line, s in rows:
            f.write(f"| {name} | {rc} | {line.replace('|', '/')} | {s:.0f} |\n")
    return 1 if failed else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("export").add_argument("--out", required=True)
    c = sub.add_parser("check")
    c.add_argument("folder")
    c.add_argument("--md", default=os.path.join(ROOT, "benchmarks", "REAL-EXPORTS.md"))
    args = p.parse_args()
    if args.cmd == "export":
        export(args.out)
    else:
        os.makedirs(os.path.dirname(args.md), exist_ok=True)
        sys.exit(check(args.folder, args.md))


if __name__ == "__main__":
    main()
