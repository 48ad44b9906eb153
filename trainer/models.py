"""Model registry: build any registered classifier by name; input is raw 0-255 RGB pixels."""
from __future__ import annotations

import math
import os

import keras
import numpy as np
from keras import layers

from .config import Config, validate
from .data import NUM_CLASSES
from .registry import spec_of


@keras.saving.register_keras_serializable(package="trainer")
class Preprocess(layers.Layer):
    """The backbone's own input scaling as a plain layer, so it saves, loads and exports like any other."""

    MODES = {
        "caffe": dict(bgr=True, mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0)),
        "torch": dict(bgr=False, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)),
        "tf": dict(bgr=False, mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5)),
        "unit": dict(bgr=False, mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0)),
        "raw": dict(bgr=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
    }

    def __init__(self, mode: str = "raw", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, x):
        spec = self.MODES[self.mode]
        if spec["bgr"]:
            x = x[..., ::-1]
        if spec["mean"] != (0.0, 0.0, 0.0):
            x = x - keras.ops.convert_to_tensor(spec["mean"], dtype=x.dtype)
        if spec["std"] != (1.0, 1.0, 1.0):
            x = x / keras.ops.convert_to_tensor(spec["std"], dtype=x.dtype)
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def image_mean(v):
    """Mean over height and width, kept as (N, 1, 1, C): the means of rows, then of those. Sums of 96 values, not
    9,216, so float32 rounds alike in Keras and in any ONNX runtime (one long sum put 1e-4 between their
    probabilities, over the export's parity limit)."""
    return keras.ops.mean(keras.ops.mean(v, axis=2, keepdims=True), axis=1, keepdims=True)


@keras.saving.register_keras_serializable(package="trainer")
class ChannelNorm(layers.Layer):
    """Each channel of each image to mean 128 and standard deviation 64: the pixel scale the backbones expect,
    with a per-image colour gain, offset or contrast factor divided out (up to clipping at 0 and 255)."""

    def __init__(self, robust: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.robust = robust

    def call(self, x):
        if not self.robust:
            centred = x - image_mean(x - 128.0) - 128.0
            return centred / keras.ops.sqrt(image_mean(centred * centred) + 1.0) * 64.0 + 128.0
        # robust: a gain per channel that brings the smear's background (the bright pixels, not clipped white)
        # to one neutral grey. A lamp's colour or a white balance is a gain, so it divides out; ink, dust or a
        # bubble over the cell leaves the background, and so the gain, nearly as it was.
        grey = keras.ops.mean(x, axis=-1, keepdims=True)
        weight = keras.ops.clip((grey - 120.0) / 40.0, 0.0, 1.0) * keras.ops.clip((250.0 - grey) / 10.0, 0.0, 1.0)
        background = image_mean(weight * x) / (image_mean(weight) + 1e-3)
        return x * (200.0 / (background + 8.0))

    def get_config(self):
        return {**super().get_config(), "robust": self.robust}


@keras.saving.register_keras_serializable(package="trainer")
class BlurPool(layers.Layer):
    """Halve height and width after a 3x3 binomial low-pass, each channel alone (Zhang, ICML 2019), so that fine
    detail or noise above the new sampling rate is averaged away instead of aliased into coarse features."""

    def call(self, x):
        taps = np.array([1.0, 2.0, 1.0])
        kernel = np.tile((np.outer(taps, taps) / 16.0)[:, :, None, None], (1, 1, x.shape[-1], 1))
        # Reflected borders: zero padding would darken the edge of every feature map it blurs.
        x = keras.ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        return keras.ops.depthwise_conv(x, keras.ops.cast(kernel, x.dtype), strides=2, padding="valid")


@keras.saving.register_keras_serializable(package="trainer")
class LocalContrast(layers.Layer):
    """The image and, beside it, each pixel's difference from its neighbourhood's mean over that neighbourhood's
    spread (a Gaussian window of sigma pixels, the spread of the three channels pooled): texture that a translucent
    veil, a blur or a local change of exposure dims comes back at its usual contrast, colours in proportion."""

    def __init__(self, sigma: float = 4.0, floor: float = 0.03, **kwargs):
        super().__init__(**kwargs)
        self.sigma = sigma
        self.floor = floor

    def call(self, x):
        radius = max(1, int(math.ceil(2.0 * self.sigma)))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / self.sigma) ** 2)
        taps = taps / taps.sum()
        channels = x.shape[-1]
        # The image and its square blurred together; reflected borders, as in BlurPool; one pass down the
        # columns, one along the rows.
        both = keras.ops.concatenate([x, x * x], axis=-1)
        both = keras.ops.pad(both, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
        down = np.tile(taps[:, None, None, None], (1, 1, 2 * channels, 1))
        along = np.tile(taps[None, :, None, None], (1, 1, 2 * channels, 1))
        both = keras.ops.depthwise_conv(both, keras.ops.cast(down, x.dtype), padding="valid")
        both = keras.ops.depthwise_conv(both, keras.ops.cast(along, x.dtype), padding="valid")
        mean, square = both[..., :channels], both[..., channels:]
        spread = keras.ops.mean(keras.ops.maximum(square - mean * mean, 0.0), axis=-1, keepdims=True)
        # The floor keeps a flat background's noise from being blown up to the contrast of a granule.
        local = (x - mean) / keras.ops.sqrt(spread + self.floor * self.floor)
        return keras.ops.concatenate([x, local], axis=-1)

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma, "floor": self.floor}


@keras.saving.register_keras_serializable(package="trainer")
class InstanceNorm(layers.Layer):
    """Each channel of each image's feature map to zero mean and unit spread, then a learned scale and shift: the
    per-image normalisation of IBN-Net (Pan et al., ECCV 2018), at inference as in training."""

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="beta")

    def call(self, x):
        centred = x - image_mean(x)
        return centred / keras.ops.sqrt(image_mean(centred * centred) + 1e-3) * self.gamma + self.beta


@keras.saving.register_keras_serializable(package="trainer")
class FeatureJitter(layers.Layer):
    """Training only: an image's per-channel feature mean and spread, each moved at random by about as much as it
    varies across the batch (DSU, Li et al., ICLR 2022), so the layers after it cannot lean on how strong a
    feature map is overall: the thing blur, contrast and stain change. The identity at inference."""

    def __init__(self, rate: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate  # share of the images moved; 0 switches the layer off, as a Dropout's rate does
        self.generator = keras.random.SeedGenerator()

    def call(self, x, training=None):
        if not training or self.rate <= 0:
            return x
        ops = keras.ops
        mean = ops.mean(x, axis=(1, 2), keepdims=True)
        std = ops.sqrt(ops.var(x, axis=(1, 2), keepdims=True) + 1e-6)
        shape = ops.shape(mean)
        # How far each channel's statistics spread across this batch sets how far one image's may move.
        new_mean = mean + keras.random.normal(shape, seed=self.generator) * ops.std(mean, axis=0, keepdims=True)
        new_std = std + keras.random.normal(shape, seed=self.generator) * ops.std(std, axis=0, keepdims=True)
        # A negative spread would flip the sign of the feature map, which no damage to a smear does.
        moved = (x - mean) / std * ops.maximum(new_std, 0.0) + new_mean
        chosen = ops.cast(keras.random.uniform((shape[0], 1, 1, 1), seed=self.generator) < self.rate, x.dtype)
        return chosen * moved + (1.0 - chosen) * x

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


def depthwise_rebuild(model: keras.Model) -> keras.Model:
    """Clone a model with every grouped Conv2D that is really depthwise rebuilt as DepthwiseConv2D.

    keras.applications' ConvNeXt runs its 7x7 depthwise convolutions as Conv2D(groups=C): about 11x slower on a
    CPU, and tf2onnx turns them into nodes ONNX Runtime refuses. Kernels (k,k,1,C) become (k,k,C,1).
    """
    def is_depthwise(layer) -> bool:
        return (isinstance(layer, layers.Conv2D) and not isinstance(layer, layers.DepthwiseConv2D)
                and layer.groups > 1 and layer.groups == layer.filters)

    def clone(layer):
        if not is_depthwise(layer):
            return layer.__class__.from_config(layer.get_config())
        cfg = layer.get_config()
        return layers.DepthwiseConv2D(
            kernel_size=cfg["kernel_size"], strides=cfg["strides"], padding=cfg["padding"],
            dilation_rate=cfg["dilation_rate"], use_bias=cfg["use_bias"], name=cfg["name"],
            data_format=cfg["data_format"], dtype=cfg.get("dtype"))

    rebuilt = keras.models.clone_model(model, clone_function=clone)
    for old, new in zip(model.layers, rebuilt.layers):
        weights = old.get_weights()
        if is_depthwise(old):
            kernel = weights[0]
            weights[0] = kernel.reshape(kernel.shape[0], kernel.shape[1], kernel.shape[3], 1)
        new.set_weights(weights)
    return rebuilt


def build_backbone(cfg: Config, input_shape: tuple[int, int, int]) -> keras.Model:
    spec = spec_of(cfg.model)
    weights = cfg.weights
    local_file = weights not in ("imagenet", "none", "", None)
    if local_file and not os.path.exists(weights):
        raise FileNotFoundError(f"weights file not found: {weights}; use --weights imagenet, none, "
                                f"or the path of a Keras weights file for {cfg.model} without its top")
    kwargs = dict(include_top=False, input_shape=input_shape,
                  weights="imagenet" if weights == "imagenet" else None)
    if spec.own_preprocessing:
        kwargs["include_preprocessing"] = True
    try:
        backbone = getattr(keras.applications, spec.keras_app)(**kwargs)
    except Exception as err:  # the download of ImageNet weights fails without internet
        if weights == "imagenet":
            raise RuntimeError(f"could not get ImageNet weights for {cfg.model} ({err}); without internet, "
                               f"download the file elsewhere and pass --weights path/to/file.h5, "
                               f"or train from scratch with --weights none") from None
        raise
    if local_file:
        backbone.load_weights(weights)
    if spec.grouped_convs:
        backbone = depthwise_rebuild(backbone)
    return backbone


def squeeze_excite(x, ratio: int, name: str):
    """Scale each channel by a gate in (0, 1) computed from the image's channel means (Hu et al., CVPR 2018)."""
    channels = x.shape[-1]
    gate = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_squeeze")(x)
    gate = layers.Dense(max(1, channels // ratio), activation="relu", name=f"{name}_reduce")(gate)
    gate = layers.Dense(channels, activation="sigmoid", name=f"{name}_gate")(gate)
    return layers.Multiply(name=f"{name}_scale")([x, gate])


def vanilla_cnn(x, cfg: Config):
    """A small VGG-style CNN that trains from scratch on a CPU: stride-2 stem, four conv blocks."""
    reg = keras.regularizers.l2(cfg.l2) if cfg.l2 > 0 else None

    def conv(x, filters, strides, kernel=3):
        return layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                             kernel_regularizer=reg)(x)

    def conv_bn(x, filters, strides=1, per_image=False, kernel=3, relu=True):
        if per_image:
            # IBN-a: some channels per image (half in the paper), the rest per batch. Two convolutions compute
            # what one would; slicing one convolution's output instead made a training step 1.4x as long.
            channels = min(filters, max(1, round(filters * cfg.instance_norm_share)))
            out = InstanceNorm()(conv(x, channels, strides, kernel))
            if channels < filters:
                per_batch = layers.BatchNormalization(momentum=0.9)(conv(x, filters - channels, strides, kernel))
                out = layers.Concatenate()([out, per_batch])
            return layers.Activation("relu")(out) if relu else out
        x = conv(x, filters, strides, kernel)
        # momentum 0.9: the moving statistics catch up within an epoch, so inference mode matches training mode
        x = layers.BatchNormalization(momentum=0.9)(x)
        return layers.Activation("relu")(x) if relu else x

    def shortcut(x, filters):
        return x if x.shape[-1] == filters else conv_bn(x, filters, kernel=1, relu=False)

    x = Preprocess(spec_of("vanilla_cnn").preprocess, name="preprocess")(x)
    if cfg.local_contrast > 0:
        x = LocalContrast(cfg.local_contrast, cfg.local_contrast_floor, name="local_contrast")(x)
    # The stem stays a strided convolution even with blur_pool: at full size it would double the cost of a step.
    # A wider stem kernel is cheap: it reads 3 (or 6) input channels, against 32 for every later convolution.
    x = conv_bn(x, cfg.width, strides=2, per_image=cfg.instance_norm and cfg.instance_norm_stem,
                kernel=cfg.stem_kernel)
    if cfg.feature_jitter > 0:
        x = FeatureJitter(cfg.feature_jitter)(x)
    for i, mult in enumerate((1, 2, 4, 8)):
        # The 48x48 block costs the most per image: one of its two convolutions is the cheap thing to drop.
        convs, block_in = cfg.first_block_convs if i == 0 else 2, x
        for j in range(convs):
            x = conv_bn(x, cfg.width * mult, per_image=cfg.instance_norm and i < 3,
                        relu=not (cfg.residual and j == convs - 1))
        if cfg.residual:
            x = layers.Activation("relu")(layers.Add()([x, shortcut(block_in, cfg.width * mult)]))
        if cfg.squeeze_excite:
            x = squeeze_excite(x, cfg.squeeze_excite, name=f"se{i}")
        if i < 3 and cfg.blur_pool:
            # the max of each 2x2 window at every position, then the blur subsamples (Zhang's MaxBlurPool)
            x = BlurPool()(layers.MaxPooling2D(pool_size=2, strides=1, padding="same")(x))
        elif i < 3:
            x = layers.MaxPooling2D()(x)
        if i < 3 and cfg.feature_jitter > 0:
            x = FeatureJitter(cfg.feature_jitter)(x)
    return x


def build_model(cfg: Config, any_size: bool = False) -> keras.Model:
    """The classifier named by cfg.model: backbone, then pooling, Dense, dropout, Dense(8, softmax).

    any_size: vanilla_cnn only, an input of any height and width, for training at low_res_size first; the same
    weights go into a 96x96 build for everything after training.
    """
    validate(cfg)
    spec = spec_of(cfg.model)
    if any_size and not spec.any_size:
        raise ValueError(f"training at a low resolution first (--low-res-size) works with vanilla_cnn only, not "
                         f"{cfg.model}; use --low-res-size 0 or --model vanilla_cnn")
    keras.utils.set_random_seed(cfg.seed)
    inputs = keras.Input((None, None, 3) if any_size else (96, 96, 3), name="pixels")  # raw 0-255 RGB
    x = ChannelNorm(robust=cfg.input_norm == "robust", name="channel_norm")(inputs) if cfg.input_norm != "none" \
        else inputs
    size = cfg.input_size
    if spec.keras_app is None:
        if size != 96:
            x = layers.Resizing(size, size, name="upscale")(x)
        x = vanilla_cnn(x, cfg)
    else:
        if size != 96:
            x = layers.Resizing(size, size, interpolation="bilinear", name="upscale")(x)
        if spec.preprocess != "raw":
            x = Preprocess(spec.preprocess, name="preprocess")(x)
        backbone = build_backbone(cfg, (size, size, 3))
        pretrained = cfg.weights != "none"
        backbone.trainable = not (pretrained and cfg.freeze_backbone)
        # A pretrained backbone keeps BatchNorm in inference mode, also while fine-tuning.
        x = backbone(x, training=False) if pretrained else backbone(x)
    reg = keras.regularizers.l2(cfg.l2) if cfg.l2 > 0 else None
    x = layers.GlobalAveragePooling2D(name=spec.feature_layer)(x)
    x = layers.Dense(cfg.dense_units, activation="relu", kernel_regularizer=reg, name="head_dense")(x)
    x = layers.Dropout(cfg.dropout, name="head_dropout")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name=cfg.model)


def backbone_of(model: keras.Model) -> keras.Model | None:
    """The nested backbone of a registry model, or None for vanilla_cnn."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return nested[0] if nested else None


def unfreeze(model: keras.Model, last_n: int = 0) -> None:
    """Make the backbone trainable: all of it (last_n=0) or its last N layers; BatchNorm stays frozen."""
    backbone = backbone_of(model)
    if backbone is None:
        return
    backbone.trainable = True
    chosen = backbone.layers if last_n <= 0 else backbone.layers[-last_n:]
    for layer in backbone.layers:
        layer.trainable = layer in chosen and not isinstance(layer, layers.BatchNormalization)


def ensemble(models: list[keras.Model]) -> keras.Model:
    """One model whose output is the mean of the members' probabilities (e.g. the K fold models)."""
    if len(models) == 1:
        return models[0]
    inputs = keras.Input((96, 96, 3), name="pixels")
    outs = []
    for i, m in enumerate(models):
        m.name = f"fold{i}_{m.name}"
        outs.append(m(inputs))
    return keras.Model(inputs, layers.Average(name="probs")(outs), name="ensemble")
