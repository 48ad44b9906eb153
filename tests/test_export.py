"""ONNX export: fused LayerNorm/GELU give the same outputs, and the parity check refuses a tampered model."""
from __future__ import annotations

import collections
import os

import keras
import numpy as np
import onnxruntime as ort
import pytest

from trainer import export


def run_onnx(onnx_model, x):
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": x.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def convnext_like():
    """A small ConvNeXt-style block with non-trivial LayerNorm gamma/beta, exact GELU (TF's Erfc) and non-zero biases
    (as after training: TF's grappler drops an add of zeros, so a zero bias would hide a difference)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((96, 96, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(16, 4, strides=4)(x)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    x = keras.layers.DepthwiseConv2D(7, padding="same")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    x = keras.layers.Dense(32, activation=lambda t: keras.activations.gelu(t, approximate=False))(x)
    x = keras.layers.Dense(16)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(8, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.LayerNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if i == 0 else
                               rng.normal(0, 0.5, w.shape).astype(np.float32)
                               for i, w in enumerate(layer.get_weights())])
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape).astype(np.float32))
    return model


def test_fused_graph_matches_unfused_and_keras(convnext_like, real_slice):
    x = real_slice[0][:16].astype(np.float32)
    plain, _ = export.to_onnx(convnext_like, fuse=False)
    fused, counts = export.to_onnx(convnext_like, fuse=True)
    ops = collections.Counter(n.op_type for n in fused.graph.node)
    assert counts["LayerNormalization"] == 2 and ops["LayerNormalization"] == 2
    assert counts["Gelu"] == 1 and ops["Gelu"] == 1 and ops["Erf"] == 0
    keras_probs = np.asarray(convnext_like.predict(x, verbose=0))
    np.testing.assert_allclose(run_onnx(plain, x), keras_probs, atol=1e-5)
    np.testing.assert_allclose(run_onnx(fused, x), run_onnx(plain, x), atol=1e-5)


def test_export_writes_a_dynamic_batch_model(tmp_path, tiny_keras_model, real_slice):
    path = tmp_path / "model.onnx"
    info = export.export_onnx(tiny_keras_model, str(path), real_slice[0][:32])
    assert info["parity"]["ok"] and info["parity"]["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "pixels"
    for n in (1, 5):
        x = real_slice[0][:n].astype(np.float32)  # raw 0-255 pixels, no scaling outside the graph
        out = session.run(None, {"pixels": x})[0]
        np.testing.assert_allclose(out, np.asarray(tiny_keras_model(x)), atol=1e-4)
    assert not list(tmp_path.glob(".*tmp"))


def test_parity_check_refuses_a_tampered_model(tmp_path, tiny_keras_model, real_slice, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the good model from an earlier export")
    real_to_onnx = export.to_onnx

    def tampered(*args, **kwargs):
        model, counts = real_to_onnx(*args, **kwargs)
        from onnx import numpy_helper
        biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        weights = numpy_helper.to_array(biggest).copy()
        weights *= -3.0
        biggest.CopyFrom(numpy_helper.from_array(weights, biggest.name))
        return model, counts

    monkeypatch.setattr(export, "to_onnx", tampered)
    with pytest.raises(export.ExportError, match="disagree"):
        export.export_onnx(tiny_keras_model, str(path), real_slice[0][:32])
    assert path.read_bytes() == b"the good model from an earlier export"  # nothing saved is lost


def test_lean_conversion_matches_tf2onnx_as_shipped(convnext_like, real_slice):
    """The memory fixes around tf2onnx change how it converts, not what: same ops, same outputs; and they undo."""
    from tf2onnx import tf_loader
    from tf2onnx.graph import Node
    before = (tf_loader.from_function, Node.update_proto, os.environ.get(export.CATCH_ERRORS))
    x = real_slice[0][:16].astype(np.float32)
    shipped, _ = export.to_onnx(convnext_like, fuse=False, lean=False)
    lean, _ = export.to_onnx(convnext_like, fuse=False, lean=True)
    assert (tf_loader.from_function, Node.update_proto, os.environ.get(export.CATCH_ERRORS)) == before
    assert collections.Counter(n.op_type for n in lean.graph.node) == \
        collections.Counter(n.op_type for n in shipped.graph.node)
    shapes = [sorted(tuple(t.dims) for t in model.graph.initializer) for model in (lean, shipped)]
    assert shapes[0] == shapes[1]
    np.testing.assert_allclose(run_onnx(lean, x), run_onnx(shipped, x), atol=1e-7)


def test_float16_weights_halve_the_file_and_compute_in_float32(tmp_path, convnext_like, real_slice):
    import onnx
    x = real_slice[0][:32]
    full = export.export_onnx(convnext_like, str(tmp_path / "full.onnx"), x)
    half = export.export_onnx(convnext_like, str(tmp_path / "half.onnx"), x, weights="float16")
    assert full["weights"] == "float32" and full["float16_tensors"] == 0
    assert half["weights"] == "float16" and half["parity"]["ok"] and half["parity"]["rule"] == "margin"
    assert half["parity"]["images"] == 32 and half["parity"]["labels_differ"] == 0
    model = onnx.load(str(tmp_path / "half.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    stored = {name for name, t in inits.items() if t.data_type == onnx.TensorProto.FLOAT16}
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] in stored]
    assert len(stored) == len(casts) == half["float16_tensors"] > 0
    assert all(n.domain == "" and n.attribute[0].i == onnx.TensorProto.FLOAT for n in casts)  # standard Cast to float
    weights = lambda kept: sum(int(np.prod(t.dims)) for t in inits.values() if kept(t))  # noqa: E731
    halved = weights(lambda t: t.data_type == onnx.TensorProto.FLOAT16)
    floats = weights(lambda t: t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
    assert halved > 0.9 * floats  # in a model this small the vectors weigh more than in ConvNeXtBase
    # Two bytes saved on every one of them, less a few hundred bytes a tensor for its Cast node (three names).
    assert full["bytes"] - half["bytes"] > 2 * halved - 500 * half["float16_tensors"]
    # ONNX Runtime folds each Cast into a float32 initializer when it loads the model: it computes in float32.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "loaded.onnx")
    ort.InferenceSession(str(tmp_path / "half.onnx"), options, providers=["CPUExecutionProvider"])
    loaded = onnx.load(str(tmp_path / "loaded.onnx"))
    assert not any(t.data_type == onnx.TensorProto.FLOAT16 for t in loaded.graph.initializer)
    np.testing.assert_allclose(run_onnx(model, x.astype(np.float32)), run_onnx(onnx.load(str(tmp_path / "full.onnx")),
                               x.astype(np.float32)), atol=1e-2)


def test_float16_agreement_allows_label_changes_only_between_near_ties():
    theirs = np.array([[0.50, 0.4995, 0.0005], [0.7, 0.2, 0.1], [0.1, 0.2, 0.7]])
    near_tie_flipped = np.array([[0.4995, 0.50, 0.0005], [0.69, 0.21, 0.1], [0.1, 0.2, 0.7]])
    check = export.agreement(near_tie_flipped, theirs, "float16")
    assert check["ok"] and check["labels_differ"] == 1
    assert check["smallest_margin_differing"] == pytest.approx(0.0005)
    confident_flipped = np.array([[0.50, 0.4995, 0.0005], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    check = export.agreement(confident_flipped, theirs, "float16")
    assert not check["ok"] and check["labels_differ_beyond_margin"] == 1
    assert check["smallest_margin_differing"] == pytest.approx(0.5)
    assert not export.agreement(near_tie_flipped, theirs, "float32")["ok"]  # float32 keeps the strict rule


def test_float16_export_refuses_a_confident_label_change(tmp_path, real_slice, monkeypatch):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((96, 96, 3))
    x = keras.layers.Conv2D(8, 8, strides=8)(keras.layers.Rescaling(1 / 255.0)(inputs))
    outputs = keras.layers.Dense(8, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    confident = keras.Model(inputs, outputs)
    dense = confident.layers[-1]
    dense.set_weights([dense.get_weights()[0] * 200.0, dense.get_weights()[1]])  # decisive: wide margins
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the good model from an earlier export")
    real_to_onnx = export.to_onnx

    def swapped_classes(*args, **kwargs):
        from onnx import numpy_helper
        model, counts = real_to_onnx(*args, **kwargs)
        last = next(t for t in model.graph.initializer if list(t.dims) == [8, 8])
        last.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(last)[:, ::-1].copy(), last.name))
        return model, counts

    monkeypatch.setattr(export, "to_onnx", swapped_classes)
    with pytest.raises(export.ExportError, match="disagree .* labels differ"):
        export.export_onnx(confident, str(path), real_slice[0][:32], weights="float16")
    assert path.read_bytes() == b"the good model from an earlier export"
