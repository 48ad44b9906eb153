"""Where JPEG's damage lives for a model: in the brightness (luma) or in the colour (chroma)?

Not part of the kit: a probe behind a note in docs/experiments.md. It scores a run's exported model (1 view,
served by submission/model.py as the zip serves it) on the run's test cells saved as JPEG by Pillow, as MedMNIST-C
saves them (its default 4:2:0 chroma: colour at half the resolution) and at 4:4:4 (colour at full resolution);
then with only the luma of the JPEG copy kept (the original's colour put back, in JPEG's own YCbCr) and with only
its chroma kept; and through the training stage's op (TensorFlow's encoder), to check that it damages as Pillow
does:

    PYTHONPATH=. .venv/bin/python docs/jpeg_check.py runs/<name> [--images 500]
"""
from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image

from trainer import medmnist_c
from trainer.evaluate import models_by_views

SEVERITIES = (2, 3, 5)  # MedMNIST-C's JPEG at qualities 30, 15 and 7


def full_chroma_jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    """As medmnist_c.jpeg_compression, but saved at 4:4:4: the colour kept at full resolution."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def tensorflow_jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    """The training stage's JPEG round trip (tf.image.adjust_jpeg_quality), back to uint8."""
    import tensorflow as tf
    out = [tf.image.adjust_jpeg_quality(image.astype(np.float32) / 255.0, quality).numpy() for image in images]
    return np.clip(np.round(np.asarray(out) * 255.0), 0, 255).astype(np.uint8)


def keep_part(original: np.ndarray, damaged: np.ndarray, part: str) -> np.ndarray:
    """damaged with only its luma ("luma") or only its chroma ("chroma") kept; the rest from original."""
    taken = slice(1, 3) if part == "luma" else slice(0, 1)  # the channels that come back from the original
    out = np.empty_like(original)
    for i, (a, b) in enumerate(zip(original, damaged)):
        mixed = np.asarray(Image.fromarray(b).convert("YCbCr")).copy()
        mixed[..., taken] = np.asarray(Image.fromarray(a).convert("YCbCr"))[..., taken]
        out[i] = np.asarray(Image.fromarray(mixed, "YCbCr").convert("RGB"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder: runs/<name> (its holdout.npz and model.onnx)")
    parser.add_argument("--images", type=int, default=500, help="how many of the run's test cells")
    args = parser.parse_args()
    held = np.load(f"{args.run}/holdout.npz")
    images, labels = held["images"][:args.images], held["labels"][:args.images]
    (_, model), = list(models_by_views(args.run, [1], "jpeg_check_model"))
    round_trip = keep_part(images, images, "luma")  # YCbCr there and back alone, the baseline of the mixes

    def accuracy(x: np.ndarray) -> str:
        return f"{np.mean(model.predict(x) == labels):.3f}"
    print(f"{args.run}: {len(images)} test cells, 1 view; clean {accuracy(images)}, "
          f"YCbCr round trip {accuracy(round_trip)}")
    print("| quality | 4:2:0 (Pillow) | 4:4:4 (Pillow) | luma only | chroma only | training op (TensorFlow) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for severity in SEVERITIES:
        quality = medmnist_c.JPEG_QUALITY[severity - 1]
        damaged = medmnist_c.jpeg_compression(images, severity, None)
        row = [accuracy(damaged), accuracy(full_chroma_jpeg(images, quality)),
               accuracy(keep_part(images, damaged, "luma")), accuracy(keep_part(images, damaged, "chroma")),
               accuracy(tensorflow_jpeg(images, quality))]
        print(f"| {quality} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
