"""ONNX export: fused LayerNorm/GELU give the same outputs, and the parity check refuses a tampered model."""
from __future__ import annotations

import collections

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
    """A small ConvNeXt-style block with non-trivial LayerNorm gamma/beta and exact GELU (TF's Erfc)."""
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
