"""The built-in model zoo: every model builds, checks, runs in onnxruntime, and its options do what they say."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import zoo
from targets.errors import ShrinkcError
from zoo.efficientnet_lite import efficientnet_b0, efficientnet_lite
from zoo.mobilenet_v1 import mobilenet_v1
from zoo.mobilenet_v2 import mobilenet_v2
from zoo.mobilenet_v3 import mobilenet_v3

# reduced sizes that keep the whole file fast
SMALL = {
    "mobilenet_v1": dict(width=0.25, resolution=64),
    "mobilenet_v2": dict(width=0.5, resolution=96),
    "mobilenet_v2_1.4": dict(resolution=64),
    "mobilenet_v3_large": dict(width=0.5, resolution=96),
    "mobilenet_v3_small": dict(width=0.75, resolution=96),
    "efficientnet_lite0": dict(resolution=64),
    "efficientnet_b0": dict(resolution=64),
    "blazeface": {},
}
BUILDERS = {
    "mobilenet_v2": lambda **kw: mobilenet_v2(width=0.35, resolution=64, **kw),
    "mobilenet_v3_large": lambda **kw: mobilenet_v3("large", width=0.5, resolution=64, **kw),
    "mobilenet_v3_small": lambda **kw: mobilenet_v3("small", width=0.5, resolution=64, **kw),
    "efficientnet_lite0": lambda **kw: efficientnet_lite(0, resolution=64, **kw),
}
ACTIVATIONS = {"Relu", "Clip", "HardSwish"}


def run(model: onnx.ModelProto) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    return sess.run(None, {model.graph.input[0].name: x})[0]


def conv_weights(model: onnx.ModelProto) -> dict[str, list[np.ndarray]]:
    """Conv weights sorted into pointwise (1x1, not squeeze-excite), squeeze-excite, depthwise, other."""
    inits = {i.name: i for i in model.graph.initializer}
    kinds: dict[str, list[np.ndarray]] = {"pointwise": [], "se": [], "depthwise": [], "other": []}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attr(node, "group") > 1:
            kinds["depthwise"].append(w)
        elif ".se." in node.name:
            kinds["se"].append(w)
        elif list(attr(node, "kernel_shape")) == [1, 1]:
            kinds["pointwise"].append(w)
        else:
            kinds["other"].append(w)
    return kinds


def attr(node: onnx.NodeProto, name: str):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def zero_share(ws: list[np.ndarray]) -> float:
    return sum(int((w == 0).sum()) for w in ws) / sum(w.size for w in ws)


@pytest.mark.parametrize("name", list(zoo.BUILTIN))
def test_builtin_builds_checks_and_runs(name):
    classes = {"num_classes": 10} if "num_classes" in zoo.options(name) else {}
    model = zoo.build(name, **classes, **SMALL[name])
    onnx.checker.check_model(model, full_check=True)
    out = run(model)
    assert out.shape == ((1, 10) if classes else (1, 896, 1))        # blazeface: a score per anchor
    assert np.isfinite(out).all()


def test_blazeface_is_the_published_detector():
    """MediaPipe's short-range face detector: 896 anchors (16x16x2 + 8x8x6), ~0.1 M weights, stride-2 blocks
    with a max-pooled shortcut, wider blocks with zero channels appended, asymmetric SAME pads; sparsity zeros
    exactly round(s x size) of every block's 1x1 weight and nothing else."""
    from zoo.blazeface import blazeface
    model = blazeface()
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MaxPool") == 3 and ops.count("Concat") == 2 and ops.count("Transpose") == 4
    n = sum(numpy_helper.to_array(i).size for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    assert 0.09e6 <= n <= 0.12e6, n
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    pads = [inits[p.input[1]] for p in model.graph.node if p.op_type == "Pad"]
    assert sum(p[5] > 0 for p in pads) == 11 and sum(p[2] != p[6] for p in pads) == 4     # channel pads, asymmetric
    sparse = blazeface(sparsity=0.8)
    inits = {i.name: numpy_helper.to_array(i) for i in sparse.graph.initializer}
    convs = {n.name: inits[n.input[1]] for n in sparse.graph.node if n.op_type == "Conv"}
    pointwise = [w for name, w in convs.items() if name.endswith(".pw")]
    assert len(pointwise) == 16 and all((w == 0).sum() == round(0.8 * w.size) for w in pointwise)
    assert zero_share([w for name, w in convs.items() if not name.endswith(".pw")]) == 0.0      # heads, dw, stem


def test_efficientnet_b0_is_lite0_with_silu_and_squeeze_excite():
    b0, lite = efficientnet_b0(resolution=64), BUILDERS["efficientnet_lite0"]()
    ops = [n.op_type for n in b0.graph.node]
    # SiLU after the stem, 15 expand convs, 16 depthwise convs, the head, and inside each block's SE: one
    # Sigmoid + Mul each; each SE's gate one Sigmoid more
    assert ops.count("Sigmoid") == 1 + 15 + 16 + 1 + 2 * 16
    assert ops.count("GlobalAveragePool") == 16 + 1 and "Clip" not in ops
    se = conv_weights(b0)["se"]
    assert len(se) == 2 * 16 and se[0].shape == (8, 32, 1, 1)          # block 0: 32 channels squeezed to 8
    shapes = lambda m, kind: [w.shape for w in conv_weights(m)[kind]]   # noqa: E731
    for kind in ("pointwise", "depthwise", "other"):
        assert shapes(b0, kind) == shapes(lite, kind), kind
    sparse = conv_weights(efficientnet_b0(resolution=64, sparsity=0.7))      # zeros in expand / project / head only
    assert all((w == 0).sum() == round(0.7 * w.size) for w in sparse["pointwise"])
    assert zero_share(sparse["se"] + sparse["depthwise"] + sparse["other"]) == 0.0


def test_registry_variants_differ():
    def stem_channels(name):
        m = zoo.build(name, resolution=64)
        return next(i.dims[0] for i in m.graph.initializer if i.name == "stem.weight")

    def n_convs(name):
        return sum(n.op_type == "Conv" for n in zoo.build(name, resolution=64).graph.node)

    assert stem_channels("mobilenet_v2") == 32 and stem_channels("mobilenet_v2_1.4") == 48
    assert n_convs("mobilenet_v3_large") > n_convs("mobilenet_v3_small")


def test_build_errors_name_the_fix():
    with pytest.raises(ShrinkcError) as e:
        zoo.build("resnet50")
    assert "mobilenet_v3_small" in e.value.fix and "efficientnet_lite0" in e.value.fix
    with pytest.raises(ShrinkcError) as e:
        zoo.build("efficientnet_lite0", width=0.5)
    assert "width" in e.value.what and "resolution" in e.value.fix
    with pytest.raises(ShrinkcError):
        zoo.build("mobilenet_v2", linear_blocks=(16,))
    with pytest.raises(ShrinkcError):
        zoo.build("mobilenet_v3_small", sparsity=1.0)
    with pytest.raises(ShrinkcError):
        mobilenet_v3("medium")
    with pytest.raises(ShrinkcError):
        efficientnet_lite(7)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_sparsity_zeros_pointwise_only(name):
    kinds = conv_weights(BUILDERS[name](sparsity=0.7))
    for w in kinds["pointwise"]:  # exactly round(0.7 * size) zeros in each tensor
        assert (w == 0).sum() == round(0.7 * w.size)
    for kind in ("depthwise", "se", "other"):
        if kinds[kind]:
            assert zero_share(kinds[kind]) == 0.0, kind
    assert zero_share(conv_weights(BUILDERS[name]())["pointwise"]) == 0.0


def test_mobilenet_v1_is_the_papers_network():
    """MobileNetV1 1.0: 13 depthwise-separable layers, 4.2 M weights (the paper's Table 1 and 2), and its
    sparsity zeros exactly round(s x size) of each pointwise weight (or whole 4x1 blocks) and nothing else."""
    model = mobilenet_v1()
    kinds = conv_weights(model)
    assert len(kinds["depthwise"]) == 13 and len(kinds["pointwise"]) == 13 and len(kinds["other"]) == 1
    n = sum(w.size for ws in kinds.values() for w in ws) + 1024 * 1000
    assert 4.2e6 <= n <= 4.25e6, n
    sparse = conv_weights(mobilenet_v1(width=0.5, resolution=64, sparsity=0.8, sparse_block=4))
    for w in sparse["pointwise"]:
        blocks = w.reshape(w.shape[0] // 4, 4, w.shape[1])
        assert (w == 0).sum() == 4 * round(0.8 * blocks.shape[0] * blocks.shape[2])
        assert np.all((blocks == 0).all(axis=1) | (blocks != 0).all(axis=1))
    assert zero_share(sparse["depthwise"] + sparse["other"]) == 0.0


@pytest.mark.parametrize("name", list(BUILDERS))
def test_linear_blocks_remove_two_activations_each(name):
    def acts(m):
        return {n.name for n in m.graph.node if n.op_type in ACTIVATIONS}
    dense, linear = acts(BUILDERS[name]()), acts(BUILDERS[name](linear_blocks=(0, 3, 5)))
    removed = dense - linear
    assert linear <= dense and len(removed) == 6
    assert all(".expand." in r or ".dw." in r for r in removed)


@pytest.mark.parametrize("name,bn", [(n, False) for n in BUILDERS] + [("mobilenet_v3_small", True)])
def test_explicit_pad_matches_conv_pads(name, bn):
    plain, padded = BUILDERS[name](bn=bn), BUILDERS[name](bn=bn, explicit_pad=True)
    convs = [n for n in padded.graph.node if n.op_type == "Conv"]
    pads = [n for n in padded.graph.node if n.op_type == "Pad"]
    kxk = [n for n in convs if attr(n, "kernel_shape")[0] > 1]
    assert len(pads) == len(kxk) > 0
    assert not any(n.op_type == "Pad" for n in plain.graph.node)
    assert all(list(attr(n, "pads")) == [0, 0, 0, 0] for n in convs)
    producers = {n.output[0]: n for n in padded.graph.node}
    assert all(producers[n.input[0]].op_type == "Pad" for n in kxk)
    inits = {i.name: numpy_helper.to_array(i) for i in padded.graph.initializer}
    for p in pads:
        assert attr(p, "mode") == b"constant" and inits[p.input[1]].dtype == np.int64
    np.testing.assert_allclose(run(padded), run(plain), rtol=1e-4, atol=1e-4)


def test_bn_option_emits_batchnorm():
    model = BUILDERS["efficientnet_lite0"](bn=True)
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert n_bn == sum(n.op_type == "Conv" for n in model.graph.node)
    assert run(model).shape == (1, 1000)


def test_demo_model_is_as_documented():
    model = zoo.demo_model()
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 224, 224]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for block in range(17):
        for part in ("expand", "project"):
            w = inits.get(f"block{block}.{part}.weight")
            if w is not None:
                assert (w == 0).sum() == (round(0.85 * w.size) if block >= 10 else 0), (block, part)
    assert (inits["head.weight"] == 0).mean() == pytest.approx(0.85, abs=1e-5)
    for name, w in inits.items():
        if name.endswith(".dw.weight") or name in ("stem.weight", "classifier.weight"):
            assert (w == 0).sum() == 0, name
    clips = {n.name for n in model.graph.node if n.op_type == "Clip"}
    linear = [b for b in range(1, 17) if f"block{b}.expand.relu6" not in clips]
    assert linear == [5, 9, 12]
    assert all(f"block{b}.dw.relu6" not in clips and f"block{b}.add" in
               {n.name for n in model.graph.node} for b in linear)
    assert len(clips) == 35 - 6
    assert run(model).shape == (1, 1000)


def test_mobilenet_v2_sparse_block_zeros_whole_4x1_blocks():
    """sparse_block=4: every pointwise weight has exactly round(0.8 * blocks) all-zero 4x1 blocks and
    no zero outside them (random normal weights are never 0 by chance)."""
    for w in conv_weights(mobilenet_v2(width=0.35, resolution=64, sparsity=0.8, sparse_block=4))["pointwise"]:
        cout, cin = w.shape[:2]
        blocks = w[:, :, 0, 0].reshape(cout // 4, 4, cin).transpose(0, 2, 1)   # [nb, cin, 4]
        zero_blocks = np.all(blocks == 0, axis=2)
        assert zero_blocks.sum() == round(0.8 * zero_blocks.size)
        assert (w == 0).sum() == 4 * zero_blocks.sum()


def test_sparse_block_must_divide_output_channels():
    from zoo.onnx_builder import zero_out
    with pytest.raises(ShrinkcError, match="not a multiple of sparse block 8"):
        zero_out(np.ones((12, 4), np.float32), 0.5, 8, np.random.default_rng(0))
