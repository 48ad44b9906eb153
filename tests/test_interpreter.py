"""submission/interpreter.py: the ONNX reader and its ops give what ONNX Runtime gives, in numpy and in TensorFlow."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("submission_interpreter", os.path.join(ROOT, "submission",
                                                                                    "interpreter.py"))
interpreter = importlib.util.module_from_spec(spec)
spec.loader.exec_module(interpreter)


def backends():
    import tensorflow as tf
    return [interpreter.NumpyOps(), interpreter.TensorFlowOps(tf)]


def run_both(model_bytes: bytes, x: np.ndarray):
    """ONNX Runtime's output and, per backend, the interpreter's."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: x})[0]
    graph = interpreter.Graph(model_bytes)
    return reference, {ops.name: interpreter.Interpreter(graph, ops).run(x) for ops in backends()}


def assert_interpreter_matches(onnx_model, x: np.ndarray, keras_model=None) -> None:
    """Both interpreter backends give ONNX Runtime's output on x, and so does keras_model when given."""
    reference, outputs = run_both(onnx_model.SerializeToString(), x)
    if keras_model is not None:
        np.testing.assert_allclose(reference, np.asarray(keras_model(x)), atol=1e-5)
    for name, out in outputs.items():
        np.testing.assert_allclose(out, reference, atol=1e-5, err_msg=name)


def test_exported_model_matches_onnxruntime(submission_dir, real_slice):
    data = (submission_dir / "model.onnx").read_bytes()
    x = real_slice[0][:48].astype(np.float32)
    reference, outputs = run_both(data, x)
    for name, out in outputs.items():
        assert out.shape == reference.shape, name
        np.testing.assert_allclose(out, reference, atol=1e-5, err_msg=name)


def test_convnext_graph_matches_onnxruntime(real_slice):
    """LayerNorm, GELU, depthwise 7x7 convolutions and the bilinear upscale: what the gpu profile exports."""
    from trainer.config import make_config
    from trainer.export import to_onnx
    from trainer.models import build_model
    model = build_model(make_config("gpu", model="convnext_tiny", weights="none", input_size=64, seed=3))
    onnx_model, fused = to_onnx(model)
    assert fused["LayerNormalization"] and fused["Gelu"]
    ops = {n.op_type for n in onnx_model.graph.node}
    assert {"Resize", "LayerNormalization", "Gelu", "Conv"} <= ops
    assert_interpreter_matches(onnx_model, real_slice[0][:6].astype(np.float32))


def test_blur_pool_graph_matches_onnxruntime(real_slice):
    """--blur-pool: reflected padding and a fixed depthwise blur after stride-1 max pooling."""
    from trainer.config import make_config
    from trainer.export import to_onnx
    from trainer.models import build_model
    model = build_model(make_config("smoke", width=8, dense_units=16, blur_pool=True, seed=4))
    onnx_model, _ = to_onnx(model)
    pads = [n for n in onnx_model.graph.node if n.op_type == "Pad"]
    assert pads and all(helper.get_attribute_value(a) == b"reflect" for n in pads for a in n.attribute
                        if a.name == "mode")
    assert_interpreter_matches(onnx_model, real_slice[0][:6].astype(np.float32))


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_instance_norm_graph_matches_onnxruntime(real_slice, share):
    """--instance-norm: per-image means and (below share 1) a concatenation of two convolutions' outputs."""
    from trainer.config import make_config
    from trainer.export import to_onnx
    from trainer.models import build_model
    model = build_model(make_config("smoke", width=8, dense_units=16, instance_norm=True,
                                    instance_norm_share=share, seed=4))
    onnx_model, _ = to_onnx(model)
    ops = {n.op_type for n in onnx_model.graph.node}
    assert "ReduceMean" in ops and ("Concat" in ops) == (share < 1)
    assert_interpreter_matches(onnx_model, real_slice[0][:6].astype(np.float32))


def test_local_contrast_graph_matches_onnxruntime(real_slice):
    """--local-contrast: reflected padding, column and row Gaussian passes, a channel mean, a square root."""
    from trainer.config import make_config
    from trainer.export import to_onnx
    from trainer.models import build_model
    model = build_model(make_config("smoke", width=8, dense_units=16, instance_norm=True, local_contrast=3.0,
                                    seed=4))
    onnx_model, _ = to_onnx(model)
    ops = {n.op_type for n in onnx_model.graph.node}
    assert {"Pad", "Sqrt", "Concat"} <= ops
    assert_interpreter_matches(onnx_model, real_slice[0][:6].astype(np.float32), model)


def test_wide_stem_graph_matches_onnxruntime(real_slice):
    """--stem-kernel 7: a stride-2 7x7 convolution, padded 2 before and 3 after on a 96-pixel side ("same")."""
    from trainer.config import make_config
    from trainer.export import to_onnx
    from trainer.models import build_model
    model = build_model(make_config("smoke", width=8, dense_units=16, instance_norm=True, stem_kernel=7, seed=5))
    onnx_model, _ = to_onnx(model)
    kernels = [list(a.ints) for n in onnx_model.graph.node if n.op_type == "Conv" for a in n.attribute
               if a.name == "kernel_shape"]
    assert [7, 7] in kernels
    assert_interpreter_matches(onnx_model, real_slice[0][:6].astype(np.float32), model)


def test_squeeze_excite_graph_matches_onnxruntime(real_slice):
    """--squeeze-excite: channel means, two dense layers and a sigmoid gate multiplied into each block."""
    from trainer.config import make_config
    from trainer.export import to_onnx
    from trainer.models import build_model
    model = build_model(make_config("smoke", width=8, dense_units=16, instance_norm=True, squeeze_excite=4, seed=6))
    onnx_model, _ = to_onnx(model)
    assert sum(n.op_type == "Sigmoid" for n in onnx_model.graph.node) == 4
    assert_interpreter_matches(onnx_model, real_slice[0][:6].astype(np.float32), model)


def test_residual_graph_matches_onnxruntime(real_slice):
    """--residual: each block's input added to its output, through a 1x1 projection where the width doubles."""
    from trainer.config import make_config
    from trainer.export import to_onnx
    from trainer.models import build_model
    cfg = dict(width=8, dense_units=16, instance_norm=True, seed=7)
    plain, _ = to_onnx(build_model(make_config("smoke", **cfg)))
    model = build_model(make_config("smoke", residual=True, **cfg))
    onnx_model, _ = to_onnx(model)
    def adds(m):
        return sum(n.op_type == "Add" for n in m.graph.node)
    assert adds(onnx_model) - adds(plain) == 4
    kernels = [list(a.ints) for n in onnx_model.graph.node if n.op_type == "Conv" for a in n.attribute
               if a.name == "kernel_shape"]
    assert kernels.count([1, 1]) == 3
    assert_interpreter_matches(onnx_model, real_slice[0][:6].astype(np.float32), model)


def many_ops_model(weights_dtype=np.float32) -> bytes:
    """A small NCHW network through the ops the registry's other models use, with odd pads, strides and groups."""
    rng = np.random.default_rng(0)

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array), name)

    w = rng.normal(0, 0.3, (6, 1, 3, 3)).astype(weights_dtype)
    inits = [init("w", w), init("b", rng.normal(0, 0.1, 6).astype(np.float32)),
             init("scale", rng.uniform(0.5, 1.5, 6).astype(np.float32)),
             init("bias", rng.normal(0, 0.1, 6).astype(np.float32)),
             init("mean", rng.normal(0, 0.1, 6).astype(np.float32)),
             init("var", rng.uniform(0.5, 1.5, 6).astype(np.float32)),
             init("pads", np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64)),
             init("starts", np.array([1, 1], np.int64)), init("ends", np.array([-1, 1000], np.int64)),
             init("axes", np.array([2, 3], np.int64)),
             init("fc", rng.normal(0, 0.2, (8, 6 * 13 * 13)).astype(np.float32)),
             init("fc_b", rng.normal(0, 0.1, 8).astype(np.float32))]
    nodes = [helper.make_node("Transpose", ["pixels"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Mul", ["nchw", "unit"], ["scaled"])]
    if weights_dtype == np.float16:
        nodes.append(helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT))
    nodes += [
        helper.make_node("Slice", ["scaled", "starts", "ends", "axes"], ["cropped"]),
        helper.make_node("Conv", ["cropped", "w32" if weights_dtype == np.float16 else "w", "b"], ["conv"],
                         group=3, strides=[2, 2], pads=[0, 1, 1, 0]),
        helper.make_node("BatchNormalization", ["conv", "scale", "bias", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("HardSwish", ["bn"], ["act"]),
        helper.make_node("MaxPool", ["act"], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["pool"], ["avg"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Sigmoid", ["avg"], ["sig"]),
        helper.make_node("Pad", ["sig", "pads"], ["padded"]),
        helper.make_node("Flatten", ["padded"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fc_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    inits.append(init("unit", np.array(1 / 255, np.float32)))
    graph = helper.make_graph(nodes, "many_ops",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 96, 96, 3])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


@pytest.mark.parametrize("weights_dtype", [np.float32, np.float16])
def test_many_ops_match_onnxruntime(real_slice, weights_dtype):
    x = real_slice[0][:8].astype(np.float32)
    reference, outputs = run_both(many_ops_model(weights_dtype), x)
    for name, out in outputs.items():
        np.testing.assert_allclose(out, reference, atol=1e-5, err_msg=name)


def test_float16_weights_are_cast_once_at_load():
    graph = interpreter.Graph(many_ops_model(np.float16))
    assert graph.initializers["w"].dtype == np.float16
    folded = interpreter.Interpreter(graph, interpreter.NumpyOps())
    assert "Cast" not in {n.op for n in folded.nodes}
    assert folded.weights["w32"].dtype == np.float32


def test_unsupported_ops_are_named_and_refused():
    graph = helper.make_graph([helper.make_node("Tile", ["x", "reps"], ["y"])], "tile",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              [numpy_helper.from_array(np.array([2, 1], np.int64), "reps")])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    parsed = interpreter.Graph(data)
    assert interpreter.unsupported_ops(parsed) == ["Tile"]
    with pytest.raises(ValueError, match="lacks these ONNX ops: Tile"):
        interpreter.Interpreter(parsed, interpreter.NumpyOps())


def test_reader_refuses_what_is_not_a_model():
    with pytest.raises(ValueError, match="not an ONNX model"):
        interpreter.Graph(b"\x0fnot a protobuf at all")


def test_erf_is_accurate():
    import math
    x = np.linspace(-5, 5, 2001).astype(np.float64)
    exact = np.array([math.erf(v) for v in x])
    assert np.abs(interpreter._erf(x) - exact).max() < 2e-7
