"""benchmark/test_time.py: its views and its BatchNorm re-estimation, on a real Keras model."""
import numpy as np
import pytest

from benchmark import test_time


def test_the_eight_views_are_the_symmetries_of_the_square():
    x = np.random.default_rng(0).integers(0, 256, (2, 12, 12, 3)).astype(np.uint8)
    views = [test_time.dihedral(x, v) for v in range(8)]
    assert np.array_equal(views[0], x)
    assert len({v.tobytes() for v in views}) == 8
    assert np.array_equal(test_time.dihedral(views[4], 4), x)  # a mirror undoes itself


def test_zooms_keep_the_size_and_a_flat_image_flat():
    flat = np.full((2, 96, 96, 3), 120, np.uint8)
    for factor in (1.15, 0.87):
        out = test_time.zoom(flat, factor)
        assert out.shape == flat.shape
        assert np.allclose(out, 120, atol=1e-3)
    ramp = np.tile(np.arange(96, dtype=np.uint8)[None, None, :, None], (1, 96, 1, 3))
    zoomed_in = test_time.zoom(ramp, 1.15)
    assert zoomed_in[0, 0, -1, 0] - zoomed_in[0, 0, 0, 0] < 90  # a crop spans less of the ramp


def test_batchnorm_statistics_come_from_the_images_and_go_back():
    import keras

    from trainer.config import make_config
    from trainer.models import build_model
    model = build_model(make_config("smoke", width=4, dense_units=16, seed=1))
    stats = test_time.BatchNormStats(model)
    assert stats.layers, "vanilla_cnn has BatchNormalization layers"
    first = stats.layers[0]
    trained = first.moving_mean.numpy().copy()
    images = np.random.default_rng(1).integers(0, 256, (40, 96, 96, 3)).astype(np.uint8)
    inputs = keras.Model(model.inputs, first.input).predict(images.astype(np.float32), verbose=0)
    expected = inputs.reshape(-1, inputs.shape[-1]).mean(0)

    stats.adapt(images, prior=0.0, batch=16)
    assert np.allclose(first.moving_mean.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(expected, trained, atol=1e-3)
    stats.adapt(images, prior=1.0, batch=16)  # half and half
    assert np.allclose(first.moving_mean.numpy(), (expected + trained) / 2, rtol=1e-4, atol=1e-4)
    stats.restore()
    assert np.array_equal(first.moving_mean.numpy(), trained)


def test_a_folder_without_a_model_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        test_time.main(["--run", str(tmp_path)])
    assert "has no model.keras" in capsys.readouterr().err


def test_shared_views_are_predicted_once_and_score_the_same():
    from trainer.config import make_config
    from trainer.models import build_model
    model = build_model(make_config("smoke", width=4, dense_units=16, seed=1))
    rng = np.random.default_rng(2)
    sets = {"a": rng.integers(0, 256, (6, 96, 96, 3)).astype(np.uint8)}
    labels = rng.integers(0, 8, 6)
    views = [(1, v) for v in range(8)] + [(1.15, 0)]
    cache = {}
    first = test_time.scores(model, sets, labels, views, cache)
    assert set(cache) == {("a", f, v) for f, v in views}
    assert test_time.scores(model, sets, labels, views) == first  # without a cache: the same figures
    assert test_time.scores(None, sets, labels, views, cache) == first  # all from the cache: no model needed
