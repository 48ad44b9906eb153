"""What each model is: the facts the code reads from its registry entry instead of guessing from its name."""
from __future__ import annotations

from dataclasses import dataclass

# Config fields that only some models read; validate() warns when a user sets one the model ignores.
VANILLA_OPTIONS = ("width", "first_block_convs", "stem_kernel", "blur_pool", "squeeze_excite", "residual",
                   "feature_jitter", "instance_norm", "instance_norm_stem", "instance_norm_share", "local_contrast",
                   "local_contrast_floor", "low_res_size")
PRETRAINED_OPTIONS = ("weights", "freeze_backbone")
FINE_TUNE_OPTIONS = ("fine_tune_epochs", "fine_tune_layers", "fine_tune_lr")


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. Kept free of Keras so the command line can check a config before TensorFlow loads."""

    keras_app: str | None           # keras.applications constructor; None = built by trainer.models (vanilla_cnn)
    preprocess: str = "raw"         # models.Preprocess mode the model expects on 0-255 input
    min_size: int = 32              # smallest input side the architecture accepts
    pretrained: bool = True         # takes ImageNet weights or a local weights file (--weights)
    fine_tunable: bool = True       # has a backbone to unfreeze in a second phase (--fine-tune-epochs)
    any_size: bool = False          # builds for an input of any size, so it can train at --low-res-size first
    own_preprocessing: bool = False  # keras.applications scales its input itself (include_preprocessing=True)
    grouped_convs: bool = False     # the stock architecture has grouped convolutions (rebuilt as depthwise)
    feature_layer: str = "pool"     # the layer whose input is the last feature map (Grad-CAM)

    def ignores(self, field: str) -> bool:
        """True when this model does not read the config field."""
        if field in VANILLA_OPTIONS:
            return self.keras_app is not None
        if field in PRETRAINED_OPTIONS:
            return not self.pretrained
        if field in FINE_TUNE_OPTIONS:
            return not self.fine_tunable
        return False


MODELS: dict[str, ModelSpec] = {
    # Small VGG-style CNN that trains from scratch on a CPU; it scales its input to 0-1 itself.
    "vanilla_cnn": ModelSpec(None, preprocess="unit", pretrained=False, fine_tunable=False, any_size=True),
    "vgg16": ModelSpec("VGG16", "caffe"),
    "resnet50": ModelSpec("ResNet50", "caffe"),
    "densenet121": ModelSpec("DenseNet121", "torch"),
    "inception_v3": ModelSpec("InceptionV3", "tf", min_size=75),
    "efficientnet_v2_b0": ModelSpec("EfficientNetV2B0", own_preprocessing=True),
    "efficientnet_v2_b3": ModelSpec("EfficientNetV2B3", own_preprocessing=True),
    "convnext_tiny": ModelSpec("ConvNeXtTiny", own_preprocessing=True, grouped_convs=True),
    "convnext_small": ModelSpec("ConvNeXtSmall", own_preprocessing=True, grouped_convs=True),
    "convnext_base": ModelSpec("ConvNeXtBase", own_preprocessing=True, grouped_convs=True),
    "convnext_large": ModelSpec("ConvNeXtLarge", own_preprocessing=True, grouped_convs=True),
    "convnext_xlarge": ModelSpec("ConvNeXtXLarge", own_preprocessing=True, grouped_convs=True),
}


def spec_of(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]
