"""The model registry: every model builds, ConvNeXt is rebuilt depthwise, weights load from a local file."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from trainer.config import make_config
from trainer.models import Preprocess, backbone_of, build_model, depthwise_rebuild, unfreeze
from trainer.registry import MODELS


@pytest.mark.parametrize("name", list(MODELS))
def test_every_registered_model_builds_at_96(name):
    cfg = make_config("cpu", model=name, weights="none")
    model = build_model(cfg)
    x = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3)).astype(np.float32)
    probs = np.asarray(model(x, training=False))
    assert probs.shape == (2, 8)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert not any(isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.DepthwiseConv2D)
                   and layer.groups > 1 for layer in model._flatten_layers())


def test_upscaling_input():
    model = build_model(make_config("cpu", model="efficientnet_v2_b0", weights="none", input_size=128))
    assert model.input_shape == (None, 96, 96, 3)
    assert backbone_of(model).input_shape == (None, 128, 128, 3)


def test_first_block_convs_drops_one_48x48_convolution():
    def convs_at_48(model):
        return [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Conv2D)
                and layer.output.shape[1] == 48 and layer.strides == (1, 1)]
    # instance norm off: it splits each early convolution into two half-width ones, which would double the count
    two = build_model(make_config("cpu", first_block_convs=2, instance_norm=False))
    one = build_model(make_config("cpu", instance_norm=False))  # the cpu profile drops it
    assert len(convs_at_48(two)) == 2 and len(convs_at_48(one)) == 1
    saved = 3 * 3 * 32 * 32 + 4 * 32  # one 3x3 32->32 kernel and its BatchNorm
    assert two.count_params() - one.count_params() == saved
    with pytest.raises(ValueError, match="first_block_convs is 3; use 2"):
        build_model(make_config("cpu", first_block_convs=3))


def test_stem_kernel_sets_the_strided_stem_convolution_only():
    def kernels(model, stride):
        return {layer.kernel_size for layer in model._flatten_layers()
                if isinstance(layer, keras.layers.Conv2D) and layer.strides == (stride, stride)}
    three, seven = (build_model(make_config("cpu", stem_kernel=k)) for k in (3, 7))
    assert kernels(three, 2) == {(3, 3)} and kernels(seven, 2) == {(7, 7)}
    assert kernels(seven, 1) == {(3, 3)}
    assert seven.output_shape == three.output_shape == (None, 8)
    # the stem reads 3 channels into cfg.width (32) filters, in two halves under instance norm
    assert seven.count_params() - three.count_params() == (49 - 9) * 3 * 32


def test_residual_adds_each_blocks_input_to_its_output():
    plain = build_model(make_config("cpu"))
    res = build_model(make_config("cpu", residual=True))
    adds = [layer for layer in res.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == 4 and not any(isinstance(layer, keras.layers.Add) for layer in plain.layers)
    # The first block keeps the stem's 32 channels: the stem's ReLU output goes straight into its sum. The other
    # three double the channels: a 1x1 convolution and a BatchNorm (4 numbers a channel) bring the input along.
    assert type(adds[0].input[1]._keras_history.operation) is keras.layers.Activation
    projections = [layer for layer in res.layers if isinstance(layer, keras.layers.Conv2D)
                   and layer.kernel_size == (1, 1)]
    assert [layer.filters for layer in projections] == [64, 128, 256]
    assert res.count_params() - plain.count_params() == sum(c // 2 * c + 4 * c for c in (64, 128, 256))
    assert res.output_shape == plain.output_shape == (None, 8)


def test_squeeze_excite_gates_each_block_channel_by_channel():
    plain = build_model(make_config("cpu"))
    gated = build_model(make_config("cpu", squeeze_excite=8))
    se_layers = [layer for layer in gated.layers if layer.name.startswith("se")]
    assert len(se_layers) == 4 * 4  # squeeze, reduce, gate and scale after each of the four blocks
    assert gated.count_params() - plain.count_params() == sum(c * c // 4 + c // 8 + c for c in (32, 64, 128, 256))

    # With every gate open (sigmoid of a large bias), the gated model computes what the plain one does with the
    # same weights; closing one gate's channel changes the output.
    weighted = [layer for layer in gated.layers if layer.weights and not layer.name.startswith("se")]
    for mine, theirs in zip(weighted, [layer for layer in plain.layers if layer.weights], strict=True):
        mine.set_weights(theirs.get_weights())
    for layer in se_layers:
        if layer.name.endswith("_gate"):
            kernel, bias = layer.get_weights()
            layer.set_weights([np.zeros_like(kernel), np.full_like(bias, 30.0)])
    x = np.random.default_rng(1).integers(0, 256, (3, 96, 96, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(gated(x)), np.asarray(plain(x)), atol=1e-5)
    gate = gated.get_layer("se1_gate")
    kernel, bias = gate.get_weights()
    bias[:32] = -30.0  # half the 64 channels of the second block shut
    gate.set_weights([kernel, bias])
    assert np.abs(np.asarray(gated(x)) - np.asarray(plain(x))).max() > 1e-3


def test_depthwise_rebuild_matches_grouped_convnext():
    stock = keras.applications.ConvNeXtTiny(include_top=False, weights=None, input_shape=(96, 96, 3))
    grouped = [layer for layer in stock.layers if isinstance(layer, keras.layers.Conv2D) and layer.groups > 1]
    assert grouped, "keras.applications builds ConvNeXt with grouped Conv2D"
    rebuilt = depthwise_rebuild(stock)
    assert sum(isinstance(layer, keras.layers.DepthwiseConv2D) for layer in rebuilt.layers) == len(grouped)
    x = np.random.default_rng(1).uniform(0, 255, (2, 96, 96, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(rebuilt(x)), np.asarray(stock(x)), atol=1e-4, rtol=1e-4)


def test_local_weights_file(tmp_path):
    cfg = make_config("cpu", model="efficientnet_v2_b0", weights="none", seed=5)
    source = backbone_of(build_model(cfg))
    path = str(tmp_path / "backbone.weights.h5")
    source.save_weights(path)
    loaded = backbone_of(build_model(make_config("cpu", model="efficientnet_v2_b0", weights=path, seed=9)))
    for a, b in zip(source.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not loaded.trainable  # pretrained backbones start frozen
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_model(make_config("cpu", model="efficientnet_v2_b0", weights=str(tmp_path / "missing.h5")))


def test_unfreeze_last_layers(tmp_path):
    path = str(tmp_path / "w.weights.h5")
    backbone_of(build_model(make_config("cpu", model="efficientnet_v2_b0", weights="none"))).save_weights(path)
    model = build_model(make_config("cpu", model="efficientnet_v2_b0", weights=path))
    unfreeze(model, last_n=10)
    backbone = backbone_of(model)
    trainable = [layer for layer in backbone.layers if layer.trainable and layer.weights]
    assert 0 < len(trainable) <= 10
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="vanilla_cnn"):
        build_model(make_config("cpu", model="resnet9000"))


def test_saved_model_round_trip(tmp_path):
    model = build_model(make_config("smoke"))
    path = str(tmp_path / "m.keras")
    model.save(path)
    again = keras.models.load_model(path)
    x = np.random.default_rng(2).integers(0, 256, (3, 96, 96, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(model(x)), atol=1e-6)
    assert any(isinstance(layer, Preprocess) for layer in again.layers)


def test_registry_lists_the_issue_models():
    for name in ("vanilla_cnn", "vgg16", "densenet121", "resnet50", "inception_v3", "efficientnet_v2_b3",
                 "convnext_tiny", "convnext_base", "convnext_large"):
        assert name in MODELS
    assert {n for n, spec in MODELS.items() if spec.keras_app} < set(MODELS)


def test_fine_tune_phase_trains_the_backbone_the_first_phase_kept_frozen(tmp_path, real_slice):
    """Pretrained weights: phase 1 leaves the backbone as loaded; phase 2 trains it, BatchNorm excepted."""
    from trainer.train import fit
    path = str(tmp_path / "pretrained.weights.h5")
    backbone_of(build_model(make_config("cpu", model="resnet50", weights="none", seed=5))).save_weights(path)
    cfg = make_config("cpu", model="resnet50", weights=path, batch_size=4, epochs=1, steps_per_epoch=1,
                      fine_tune_epochs=1, fine_tune_lr=1e-2, randaugment=False, time_budget_min=0.0)
    images, labels = real_slice
    model, history = fit(cfg, str(tmp_path / "run"), images, labels, np.arange(16), np.arange(16, 20), deadline=0.0)
    assert len(history["accuracy"]) == 2  # one epoch per phase

    def backbone_weights(model):
        return {w.path: np.asarray(w) for w in backbone_of(model).weights}

    loaded = backbone_weights(build_model(cfg))
    after_phase_1 = build_model(cfg)
    after_phase_1.load_weights(str(tmp_path / "run" / "phase_train" / "best.weights.h5"))
    for name, value in backbone_weights(after_phase_1).items():
        np.testing.assert_array_equal(value, loaded[name], err_msg=name)
    changed = {name for name, value in backbone_weights(model).items() if not np.array_equal(value, loaded[name])}
    batchnorm = {w.path for layer in backbone_of(model).layers if isinstance(layer, keras.layers.BatchNormalization)
                 for w in layer.weights}
    kernels = {name for name in loaded if name.endswith("kernel")}
    assert not changed & batchnorm
    assert len(changed & kernels) > len(kernels) // 2, f"{len(changed & kernels)} of {len(kernels)} kernels trained"


def test_channel_norm_divides_out_a_colour_cast_brightness_and_contrast(real_slice):
    from trainer.models import ChannelNorm
    cells = real_slice[0][:8].astype(np.float32)
    model = build_model(make_config("smoke", input_norm="channel", seed=3))
    assert isinstance(model.layers[1], ChannelNorm), "the norm comes first, before any layer that learns"
    assert not any(isinstance(layer, ChannelNorm) for layer in build_model(make_config("smoke")).layers)
    # a warm cast and lower contrast, kept inside 0-255 so clipping plays no part
    cast = (cells - cells.mean()) * 0.6 * np.array([1.1, 0.95, 0.8], np.float32) + np.array([140, 120, 100],
                                                                                            np.float32)
    assert cast.min() >= 0 and cast.max() <= 255
    norm = ChannelNorm()
    before, after = norm(cells).numpy(), norm(cast).numpy()
    np.testing.assert_allclose(before.mean(axis=(1, 2)), 128.0, atol=0.05)
    np.testing.assert_allclose(before.std(axis=(1, 2)), 64.0, rtol=1e-2)
    assert np.abs(before - after).max() < 1.0, "the cast should be divided out"
    assert np.abs(cells - cast).mean() > 20


def test_channel_norm_exports_and_runs_in_onnx_runtime(tmp_path, real_slice):
    import onnxruntime as ort

    from trainer.export import export_onnx
    model = build_model(make_config("smoke", input_norm="channel", seed=3))
    info = export_onnx(model, str(tmp_path / "m.onnx"), real_slice[0][:16])
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    x = real_slice[0][16:32].astype(np.float32)
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(onnx_out, model.predict(x, verbose=0), atol=1e-4)
    assert info["sha256"]


def test_robust_norm_divides_out_a_lamp_colour_and_ignores_a_blot(real_slice):
    from trainer.models import ChannelNorm
    cells = real_slice[0][:8].astype(np.float32)
    model = build_model(make_config("smoke", input_norm="robust", seed=3))
    assert isinstance(model.layers[1], ChannelNorm) and model.layers[1].robust
    robust, plain = ChannelNorm(robust=True), ChannelNorm()
    lamp = cells * np.array([0.9, 0.8, 0.7], np.float32)  # a gain per channel, as a white balance is
    # not exact: which pixels count as background moves with the gain, and so a little of the gain stays
    moved = np.abs(robust(cells).numpy() - robust(lamp).numpy()).mean()
    assert moved < 0.3 * np.abs(cells - lamp).mean(), (moved, np.abs(cells - lamp).mean())
    blotted = cells.copy()
    blotted[:, 30:60, 30:60] = 0.0  # ink over the middle of the cell
    outside = np.ones((96, 96), bool)
    outside[30:60, 30:60] = False
    moved = {name: np.abs(norm(cells).numpy() - norm(blotted).numpy())[:, outside].mean()
             for name, norm in (("robust", robust), ("plain", plain))}
    assert moved["robust"] < 2.0 and moved["plain"] > 5 * moved["robust"], moved


def test_blur_pool_keeps_flat_maps_and_removes_the_finest_pattern():
    from trainer.models import BlurPool
    flat = np.full((1, 48, 48, 3), 5.0, np.float32)
    out = np.asarray(BlurPool()(flat))
    assert out.shape == (1, 24, 24, 3)
    np.testing.assert_allclose(out, 5.0, atol=1e-5)  # reflected borders: the edge is not darkened
    # A one-pixel checkerboard is what plain subsampling aliases into a flat map of its peaks; the blur averages
    # it to its mean away from the border instead.
    checker = (np.indices((48, 48)).sum(0) % 2).astype(np.float32)[None, :, :, None] * 2.0
    assert np.ptp(checker[:, ::2, ::2]) == 0 and checker[0, 0, 0, 0] == 0.0  # what subsampling alone keeps
    np.testing.assert_allclose(np.asarray(BlurPool()(checker))[0, 1:-1, 1:-1], 1.0, atol=1e-5)


def test_blur_pool_model_saves_and_loads(tmp_path):
    model = build_model(make_config("smoke", width=8, dense_units=16, blur_pool=True, seed=2))
    x = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3)).astype(np.float32)
    assert sum(type(layer).__name__ == "BlurPool" for layer in model.layers) == 3
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)


def _channel_stats(x):
    return x.mean(axis=(1, 2)), x.std(axis=(1, 2))


def test_feature_jitter_moves_each_images_channel_statistics_by_the_batch_spread_in_training_only():
    from trainer.models import FeatureJitter
    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)
    # 64 feature maps whose channel means and spreads differ from image to image, as after a ReLU block
    # (spreads far above their own spread across the batch, so no move takes one below zero)
    x = (rng.normal(0, 1, (64, 12, 12, 4)) * rng.uniform(2.0, 3.0, (64, 1, 1, 4))
         + rng.uniform(1.0, 9.0, (64, 1, 1, 4))).astype(np.float32)
    mean, std = _channel_stats(x)
    everyone = FeatureJitter(rate=1.0)
    np.testing.assert_array_equal(np.asarray(everyone(x, training=False)), x)
    np.testing.assert_array_equal(np.asarray(FeatureJitter(rate=0.0)(x, training=True)), x)
    out = np.asarray(everyone(x, training=True))
    new_mean, new_std = _channel_stats(out)
    # only the statistics move: each standardised map stays what it was
    assert new_std.min() > 0.5
    z_in = (x - mean[:, None, None]) / std[:, None, None]
    z_out = (out - new_mean[:, None, None]) / new_std[:, None, None]
    np.testing.assert_allclose(z_out, z_in, atol=2e-3)
    # each channel's move, in units of how much that channel's statistic spreads across the batch, is N(0, 1)
    for moved in ((new_mean - mean) / mean.std(0), (new_std - std) / std.std(0)):
        assert 0.75 < moved.std() < 1.25 and abs(moved.mean()) < 0.3, (moved.std(), moved.mean())
    half = np.asarray(FeatureJitter(rate=0.5)(x, training=True))
    untouched = np.all(half == x, axis=(1, 2, 3)).mean()
    assert 0.25 < untouched < 0.75, untouched


def test_feature_jitter_model_predicts_alike_every_time_and_saves(tmp_path):
    from trainer.evaluate import train_vs_inference_mode
    from trainer.models import FeatureJitter
    model = build_model(make_config("smoke", width=8, dense_units=16, feature_jitter=1.0, seed=2))
    assert sum(isinstance(layer, FeatureJitter) for layer in model.layers) == 4  # after the stem and 3 blocks
    x = np.random.default_rng(0).integers(0, 256, (16, 96, 96, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
    # Keras' training mode moves them; the check of training against inference mode switches them off
    assert np.abs(np.asarray(model(x, training=True)) - np.asarray(model(x, training=True))).max() > 1e-4
    # A head without the hidden units' shared level, so that small moves of the features change labels
    head = model.get_layer("probs")
    kernel, bias = head.get_weights()
    head.set_weights([kernel - kernel.mean(axis=0, keepdims=True), bias * 0])
    jitters = [layer for layer in model.layers if isinstance(layer, FeatureJitter)]
    resting = jitters + [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    rates = [layer.rate for layer in resting]
    for layer in resting:
        layer.rate = 0.0
    still = np.asarray(model(x, training=True)).argmax(1)  # training mode's labels with these layers at rest
    for layer, rate in zip(resting, rates):
        layer.rate = rate
    assert train_vs_inference_mode(model, x, still, batch_size=16)["training_mode_accuracy"] == 1.0
    assert all(layer.rate == 1.0 for layer in jitters)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)


def test_instance_norm_divides_out_each_images_channel_gain_and_offset(real_slice):
    from trainer.models import InstanceNorm
    cells = real_slice[0][:8].astype(np.float32)
    rng = np.random.default_rng(1)
    changed = cells * rng.uniform(0.3, 2.0, (8, 1, 1, 3)) + rng.uniform(-50, 50, (8, 1, 1, 3))
    norm = InstanceNorm()
    before, after = np.asarray(norm(cells)), np.asarray(norm(changed))
    np.testing.assert_allclose(before.mean(axis=(1, 2)), 0.0, atol=1e-3)
    np.testing.assert_allclose(before.std(axis=(1, 2)), 1.0, rtol=1e-3)
    np.testing.assert_allclose(after, before, atol=2e-3)
    norm.gamma.assign([2.0, 1.0, 0.5])
    norm.beta.assign([1.0, 0.0, -1.0])
    np.testing.assert_allclose(np.asarray(norm(cells)).mean(axis=(1, 2)), np.tile([1.0, 0.0, -1.0], (8, 1)), atol=1e-3)


def test_instance_norm_model_normalises_half_the_early_channels_and_saves(tmp_path):
    from trainer.models import InstanceNorm
    model = build_model(make_config("smoke", width=8, dense_units=16, instance_norm=True, seed=2))
    norms = [layer for layer in model.layers if isinstance(layer, InstanceNorm)]
    # the stem and the first three blocks' two convolutions each; the last block keeps BatchNorm alone
    assert [layer.gamma.shape[0] for layer in norms] == [4, 4, 4, 8, 8, 16, 16]
    blocks_only = build_model(make_config("smoke", width=8, dense_units=16, instance_norm=True,
                                          instance_norm_stem=False, seed=2))
    # --instance-norm-stem false: the stem's 8 channels all go through BatchNorm, the blocks keep their halves
    stem = next(layer for layer in blocks_only.layers if isinstance(layer, keras.layers.Conv2D))
    assert stem.filters == 8
    assert [layer.gamma.shape[0] for layer in blocks_only.layers
            if isinstance(layer, InstanceNorm)] == [4, 4, 8, 8, 16, 16]
    x = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3)).astype(np.float32)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)


def test_instance_norm_share_sets_how_many_early_channels_are_per_image(tmp_path):
    from trainer.models import InstanceNorm
    batch_norm = keras.layers.BatchNormalization
    three_quarters = build_model(make_config("smoke", width=8, dense_units=16, instance_norm=True,
                                             instance_norm_share=0.75, seed=2))
    assert [layer.gamma.shape[0] for layer in three_quarters.layers
            if isinstance(layer, InstanceNorm)] == [6, 6, 6, 12, 12, 24, 24]
    # the rest of each early convolution's channels, then the last block's two convolutions whole
    assert [layer.gamma.shape[0] for layer in three_quarters.layers
            if isinstance(layer, batch_norm)] == [2, 2, 2, 4, 4, 8, 8, 64, 64]
    # share 1: no BatchNorm half and nothing to concatenate in the early layers
    all_per_image = build_model(make_config("smoke", width=8, dense_units=16, instance_norm=True,
                                            instance_norm_share=1.0, seed=2))
    assert [layer.gamma.shape[0] for layer in all_per_image.layers
            if isinstance(layer, InstanceNorm)] == [8, 8, 8, 16, 16, 32, 32]
    assert [layer.gamma.shape[0] for layer in all_per_image.layers if isinstance(layer, batch_norm)] == [64, 64]
    assert not any(isinstance(layer, keras.layers.Concatenate) for layer in all_per_image.layers)
    x = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3)).astype(np.float32)
    all_per_image.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(all_per_image(x)), atol=1e-6)


def test_local_contrast_restores_texture_under_a_veil_and_saves(real_slice, tmp_path):
    from trainer.models import LocalContrast
    cells = real_slice[0][:6].astype(np.float32) / 255.0
    layer = LocalContrast(sigma=4.0, floor=0.03)
    out = np.asarray(layer(cells))
    assert out.shape == (6, 96, 96, 6)
    np.testing.assert_allclose(out[..., :3], cells, atol=1e-6)  # the image passes through beside its contrast
    # a translucent light veil over the left half: there the image's detail falls to 0.6 of itself, its local
    # contrast stays near what it was (away from the veil's edge, where the window sees both sides)
    veiled = cells.copy()
    veiled[:, :, :48] = cells[:, :, :48] * 0.6 + 0.4 * 0.95
    local, local_veiled = out[..., 3:], np.asarray(layer(veiled))[..., 3:]
    inside, outside = np.s_[:, :, 8:36], np.s_[:, :, 60:88]
    assert np.abs(local_veiled[inside]).mean() / np.abs(local[inside]).mean() > 0.85
    np.testing.assert_allclose(local_veiled[outside], local[outside], atol=1e-5)
    # a flat image has no contrast to restore: the floor keeps it at zero, not at noise blown up
    flat = np.asarray(layer(np.full((1, 32, 32, 3), 0.7, np.float32)))[..., 3:]
    np.testing.assert_allclose(flat, 0.0, atol=1e-4)
    # a higher floor divides low-contrast patches by more: less of their texture lifted
    assert np.abs(np.asarray(LocalContrast(4.0, floor=0.08)(cells))[..., 3:]).mean() < 0.8 * np.abs(local).mean()
    model = build_model(make_config("smoke", width=8, dense_units=16, local_contrast=4.0, local_contrast_floor=0.08,
                                    seed=2))
    stem = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert stem.kernel.shape[2] == 6  # the stem reads the image and its local contrast
    assert model.get_layer("local_contrast").floor == 0.08
    x = real_slice[0][:3].astype(np.float32)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)
