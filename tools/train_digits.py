"""Train a small MobileNetV2-style CNN on scikit-learn's digits and export it to ONNX with torch.onnx.

  python tools/train_digits.py OUT_DIR [--epochs 15] [--resolution 16] [--seed 0] [--linearity W] [--expansion 6]
                                       [--linear-blocks K [--finetune-epochs 60] [--range-weight 5.0]]

The digits data set (1797 grey 8x8 images, 10 classes) ships inside scikit-learn. Images are
scaled to [0, 1] and enlarged to `resolution` (nearest neighbour), then split once, stratified,
into a training split (55%), a calibration split (15%, never trained on: what `--calib` gets, so the
agreement budget is checked on images the network has not fitted) and a held-out split (30%). The network: 3x3 stem + BN + ReLU6,
inverted residual blocks (1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN,
residual add where the shape allows), 1x1 head + BN + ReLU6, global average pool, linear.
Trained with Adam on one thread; exported in eval mode (torch folds BN into the convs).
`--linearity` adds DepthShrinker's idea in its simplest form to the loss: the mean distance of
every block ReLU6's inputs from [0, 6] times the given weight, so blocks that do not need their
activations learn to keep them linear. Which blocks end up linear is left to the network (and
found by `shrinkc compile --shrink auto`, not told to it).
`--linear-blocks K` trains the way DepthShrinker does (train, choose the activations the network needs least,
fine-tune without them): after the epochs, the K blocks whose activations matter least on the training split
are fine-tuned without them while a penalty keeps their ReLU6 inputs in [0, 6]; the exported model still has
every ReLU6, and `--shrink auto` is not told which blocks were fine-tuned.

Writes OUT_DIR/digits.onnx, train_x.npy / train_y.npy, calib_x.npy, test_x.npy / test_y.npy, train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

# (output channels, stride) per inverted residual block; the expansion is an option (MobileNetV2's 6 by default:
# at 4 the merged dense 3x3 conv needs more FLOPs than the block, and the cost declines merging it)
BLOCKS = [(16, 1), (16, 1), (24, 2), (24, 1), (24, 1), (32, 2), (32, 1), (32, 1)]
EXPANSION = 6
FINETUNE_EPOCHS = 60   # --linear-blocks: fine-tuning epochs without the chosen blocks' activations
RANGE_WEIGHT = 5.0     # --linear-blocks: weight of their ReLU6 inputs' distance from [0, 6]
STEM, HEAD, CLASSES = 16, 64, 10
TEST_SHARE = 0.3
CALIB_SHARE = 0.15   # of the whole set, taken from what is not held out


def load_digits(resolution: int, seed: int) -> dict[str, np.ndarray]:
    """train_x / train_y, calib_x, test_x / test_y: x float32 [N, 1, R, R] in [0, 1], y int64."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split
    data = sk_digits()
    x = (data.images / 16.0).astype(np.float32)
    scale = resolution // 8
    if scale * 8 != resolution:
        raise SystemExit(f"--resolution {resolution} must be a multiple of 8 (the digits are 8x8)")
    x = x.repeat(scale, axis=1).repeat(scale, axis=2)[:, None]
    xrest, xte, yrest, yte = train_test_split(x, data.target.astype(np.int64), test_size=TEST_SHARE,
                                              stratify=data.target, random_state=seed)
    xtr, xcal, ytr, _ = train_test_split(xrest, yrest, test_size=CALIB_SHARE / (1 - TEST_SHARE), stratify=yrest,
                                         random_state=seed)
    return {"train_x": xtr, "train_y": ytr, "calib_x": xcal, "test_x": xte, "test_y": yte}


def make_net(expansion: int = EXPANSION):
    import torch
    from torch import nn

    def conv_bn(cin, cout, k, stride=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, t, cout, stride):
            super().__init__()
            hidden = cin * t
            self.expand = conv_bn(cin, hidden, 1)
            self.dw = conv_bn(hidden, hidden, 3, stride, groups=hidden)
            self.project = conv_bn(hidden, cout, 1, act=False)
            self.residual = stride == 1 and cin == cout

            # True while DepthShrinker-style fine-tuning trains this block without its activations; the
            # pre-activations are then kept in `pre` for the range penalty. The export always has the ReLU6s
            self.linear, self.pre = False, []

        def step(self, seq, x):
            if not self.linear:
                return seq(x)
            y = seq[1](seq[0](x))   # conv, BN: the ReLU6 left out
            self.pre.append(y)
            return y

        def forward(self, x):
            y = self.project(self.step(self.dw, self.step(self.expand, x)))
            return x + y if self.residual else y

    class DigitNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(1, STEM, 3)
            blocks, cin = [], STEM
            for c, s in BLOCKS:
                blocks.append(InvertedResidual(cin, expansion, c, s))
                cin = c
            self.blocks = nn.Sequential(*blocks)
            self.head = conv_bn(cin, HEAD, 1)
            self.classifier = nn.Linear(HEAD, CLASSES)

        def forward(self, x):
            x = self.head(self.blocks(self.stem(x)))
            return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return DigitNet()


def block_activation_inputs(net) -> list:
    """Hooks on every block ReLU6; the returned list fills with their inputs on each forward pass."""
    seen = []
    for b in net.blocks:
        for seq in (b.expand, b.dw):
            seq[2].register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    return seen


def fit(net, xt, yt, epochs: int, lr: float, rng, extra_loss=None) -> None:
    """Adam with a cosine schedule over `epochs`, batches of 64; `extra_loss()` is added to each batch's loss."""
    import torch
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        net.train()
        for idx in np.array_split(rng.permutation(len(xt)), max(1, len(xt) // 64)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            if extra_loss is not None:
                loss = loss + extra_loss()
            loss.backward()
            opt.step()
        sched.step()


def range_distance(pre, squared: bool = False) -> "torch.Tensor":
    """Mean distance d of ReLU6 inputs from [0, 6], where ReLU6 is the identity (d + d * d if `squared`), summed
    over the given tensors."""
    import torch
    total = 0
    for p in pre:
        d = torch.relu(-p) + torch.relu(p - 6)
        total = total + (d + d * d if squared else d).mean()
    return total


def least_needed_blocks(net, xt, yt, count: int) -> tuple[list[int], list[float]]:
    """The `count` blocks whose activations the trained network needs least: training-split loss with only that
    block's activations left out (DepthShrinker learns this ranking with gates; one forward pass per block here)."""
    import torch
    net.eval()
    losses = []
    with torch.no_grad():
        for b in net.blocks:
            b.linear = True
            losses.append(float(torch.nn.functional.cross_entropy(net(xt), yt)))
            b.linear, b.pre = False, []
    return sorted(np.argsort(losses, kind="stable")[:count].tolist()), losses


def train(out_dir: str, epochs: int = 15, resolution: int = 16, seed: int = 0, linearity: float = 0.0,
          expansion: int = EXPANSION, linear_blocks: int = 0, finetune_epochs: int = FINETUNE_EPOCHS,
          range_weight: float = RANGE_WEIGHT) -> dict:
    """Train, export, save the splits; returns what train.json holds (accuracy, time, paths).

    `linear_blocks` > 0 adds DepthShrinker's fine-tuning: after the first `epochs`, the blocks whose activations
    the network needs least are trained `finetune_epochs` more without their activations (the rest of the
    network adapts to that), with `range_weight` times the distance d of their ReLU6 inputs from [0, 6] (as
    d + d * d) added to the loss: a block without activations is linear, so an affine change of its hidden
    channels costs the network little (the next conv undoes it, but at the depthwise conv's zero-padded borders)
    and the penalty can move them into the range where ReLU6 is the identity. The fine-tuning learning rate is
    3e-3: at 1e-3 the eight-block run ended near a guess's held-out accuracy. The export keeps every ReLU6 (the
    architecture does not change); `--shrink auto` has to find by calibration which blocks can lose theirs."""
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    splits = load_digits(resolution, seed)
    xtr, ytr, xte, yte = splits["train_x"], splits["train_y"], splits["test_x"], splits["test_y"]
    net = make_net(expansion)
    pre = block_activation_inputs(net) if linearity else []
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    rng = np.random.default_rng(seed)

    def penalty():   # distance of the ReLU6 inputs from [0, 6], where ReLU6 is the identity
        out = linearity * range_distance(pre)
        pre.clear()
        return out

    t0 = time.perf_counter()
    fit(net, xt, yt, epochs, 3e-3, rng, penalty if linearity else None)
    chosen, losses = [], []
    if linear_blocks:
        chosen, losses = least_needed_blocks(net, xt, yt, linear_blocks)
        linear = [net.blocks[i] for i in chosen]
        for b in linear:
            b.linear = True

        def range_penalty():   # squared as well: the few large excursions are what removal would change most
            out = range_weight * range_distance([p for b in linear for p in b.pre], squared=True)
            for b in linear:
                b.pre = []
            pre.clear()   # the --linearity hooks, not used while fine-tuning
            return out

        fit(net, xt, yt, finetune_epochs, 3e-3, rng, range_penalty)
        for b in linear:
            b.linear, b.pre = False, []
    train_s = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        acc = float((net(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    paths = {k: os.path.join(out_dir, f"{k}.npy") for k in splits}
    for k, a in splits.items():
        np.save(paths[k], a)
    onnx_path = os.path.join(out_dir, "digits.onnx")
    export(net, resolution, onnx_path)
    info = {"onnx": onnx_path, **paths, "epochs": epochs, "resolution": resolution, "seed": seed,
            "linearity": linearity, "expansion": expansion, "linear_blocks": chosen,
            "finetune_epochs": finetune_epochs if linear_blocks else 0, "range_weight": range_weight,
            "block_losses": [round(v, 4) for v in losses],
            "train_s": round(train_s, 1), "torch_test_accuracy": acc, "train_samples": len(xtr),
            "calib_samples": len(splits["calib_x"]), "test_samples": len(xte), "blocks": BLOCKS}
    with open(os.path.join(out_dir, "train.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def export(net, resolution: int, path: str) -> None:
    """torch.onnx's TorchScript exporter, as most published ONNX models were made (BN folded in eval mode)."""
    import torch
    x = torch.zeros(1, 1, resolution, resolution)
    torch.onnx.export(net, (x,), path, input_names=["input"], output_names=["logits"], opset_version=13,
                      do_constant_folding=True, dynamo=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--linearity", type=float, default=0.0, help="weight of the ReLU6 linearity penalty")
    parser.add_argument("--expansion", type=int, default=EXPANSION, help="expansion factor of every block")
    parser.add_argument("--linear-blocks", type=int, default=0,
                        help="fine-tune this many blocks without their activations (DepthShrinker), 0: none")
    parser.add_argument("--finetune-epochs", type=int, default=FINETUNE_EPOCHS)
    parser.add_argument("--range-weight", type=float, default=RANGE_WEIGHT,
                        help="weight of the fine-tuned blocks' distance from ReLU6's identity range")
    args = parser.parse_args()
    info = train(args.out_dir, args.epochs, args.resolution, args.seed, args.linearity, args.expansion,
                 args.linear_blocks, args.finetune_epochs, args.range_weight)
    print(f"trained in {info['train_s']} s: held-out accuracy {info['torch_test_accuracy']:.4f}; wrote {info['onnx']}")


if __name__ == "__main__":
    main()
