"""tools/train_digits.py's DepthShrinker-style fine-tuning (the model `tools/bench.py shrink-auto` trains).

Needs torch (the `bench` extra); skipped where it is not installed (`make test` installs only the `test` extra).
"""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
torch = pytest.importorskip("torch", reason="train_digits needs torch: pip install -e '.[bench]'")
import train_digits  # noqa: E402


def _block_without_activations(b, x):
    h = b.expand[1](b.expand[0](x))
    h = b.dw[1](b.dw[0](h))
    y = b.project(h)
    return x + y if b.residual else y


def test_a_linear_block_leaves_out_its_activations_and_keeps_their_inputs():
    torch.manual_seed(0)
    net = train_digits.make_net().eval()
    b = net.blocks[1]   # 16 -> 16, stride 1: has the residual add
    x = torch.randn(2, 16, 8, 8) * 20   # far outside [0, 6], so ReLU6 changes it
    with torch.no_grad():
        with_acts = b(x)
        b.linear = True
        without = b(x)
        assert len(b.pre) == 2 and all(p.shape[1] == 96 for p in b.pre)
        assert torch.allclose(without, _block_without_activations(b, x), atol=1e-5)
        assert not torch.allclose(without, with_acts, atol=1e-3)


def test_range_distance_is_zero_inside_relu6s_identity_range():
    inside = torch.tensor([0.0, 3.0, 6.0])
    outside = torch.tensor([-2.0, 8.0])   # distances 2 and 2
    assert float(train_digits.range_distance([inside])) == 0.0
    assert float(train_digits.range_distance([outside])) == pytest.approx(2.0)
    assert float(train_digits.range_distance([outside], squared=True)) == pytest.approx(6.0)


def test_least_needed_blocks_ranks_by_the_loss_without_each_block():
    torch.manual_seed(0)
    net = train_digits.make_net()
    xt = torch.rand(32, 1, 16, 16)
    yt = torch.from_numpy(np.arange(32) % 10)
    chosen, losses = train_digits.least_needed_blocks(net, xt, yt, 3)
    assert len(losses) == len(train_digits.BLOCKS) and len(chosen) == 3
    assert sorted(chosen) == chosen
    assert max(losses[i] for i in chosen) <= min(losses[i] for i in range(len(losses)) if i not in chosen)
    assert not any(b.linear or b.pre for b in net.blocks)   # every block back as it was


def test_fine_tuned_export_keeps_every_relu6(tmp_path):
    pytest.importorskip("sklearn")
    onnx = pytest.importorskip("onnx")
    info = train_digits.train(str(tmp_path), epochs=1, resolution=8, linear_blocks=2, finetune_epochs=1)
    assert len(info["linear_blocks"]) == 2 and info["finetune_epochs"] == 1
    ops = [n.op_type for n in onnx.load(info["onnx"]).graph.node]
    # stem, two per block, head: ReLU6 exports as Clip
    assert ops.count("Clip") == 2 + 2 * len(train_digits.BLOCKS)
