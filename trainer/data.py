"""Load, validate, clean and split the course's training_set.npz."""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

NUM_CLASSES = 8
IMAGE_SHAPE = (96, 96, 3)


class DataError(ValueError):
    """A data file that cannot be used, with a message that says why and what to do."""


def load_npz(path: str, resize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images (N,96,96,3) uint8 and labels (N,) int64 from a course-format .npz file."""
    images, labels = load_npz_images(path, resize)
    if labels is None:
        raise DataError(f"{path} lacks key 'labels'; the course file has 'images' (N,96,96,3) and 'labels' (N,1)")
    return images, labels


def load_npz_images(path: str, resize: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Images and, when the file has them, labels: for scoring or timing any set, labelled or not."""
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}. Put the course's training_set.npz at data/training_set.npz "
                        f"or pass DATA=path/to/training_set.npz")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if "images" not in keys:
                raise DataError(f"{path} lacks key 'images' (has {sorted(keys)}); "
                                f"the course file has 'images' (N,96,96,3) and 'labels' (N,1)")
            images = npz["images"]
            labels = npz["labels"] if "labels" in keys else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path} is not a readable .npz file ({type(err).__name__}: {err}); "
                        f"re-download the course's training_set.npz") from None
    images = validate_images(images, path, resize)
    return images, None if labels is None else validate_labels(labels, len(images), path)


def validate_images(images: np.ndarray, source: str = "images", resize: bool = False) -> np.ndarray:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{source}: images have shape {images.shape}; expected (N,96,96,3) RGB")
    if images.shape[1:3] != IMAGE_SHAPE[:2]:
        if not resize:
            raise DataError(f"{source}: images are {images.shape[1]}x{images.shape[2]}, expected 96x96; "
                            f"pass --resize to resize them")
        images = resize_images(images, IMAGE_SHAPE[:2])
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.number):
            raise DataError(f"{source}: images have dtype {images.dtype}; expected uint8 0-255")
        if np.isnan(images).any() if np.issubdtype(images.dtype, np.floating) else False:
            raise DataError(f"{source}: images contain NaN")
        top = float(images.max()) if images.size else 0.0
        scale = 255.0 if top <= 1.0 else 1.0  # 0-1 floats
        images = np.clip(np.rint(images.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return images


def validate_labels(labels: np.ndarray, n: int, source: str = "labels") -> np.ndarray:
    """Accept (N,), (N,1) or one-hot (N,8); return (N,) int64 in 0-7."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == NUM_CLASSES:
        if not np.all((labels == 0) | (labels == 1)) or not np.all(labels.sum(1) == 1):
            raise DataError(f"{source}: labels of shape {labels.shape} look one-hot but rows are not 0/1 with one 1")
        labels = labels.argmax(1)
    elif labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    elif labels.ndim != 1:
        raise DataError(f"{source}: labels have shape {labels.shape}; expected (N,), (N,1) or one-hot (N,8)")
    if len(labels) != n:
        raise DataError(f"{source}: {len(labels)} labels for {n} images; they must match")
    if not np.issubdtype(labels.dtype, np.number):
        raise DataError(f"{source}: labels have dtype {labels.dtype}; expected integers 0-7")
    if n and (np.any(labels != np.round(labels)) or labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{source}: labels range {labels.min()}..{labels.max()}; expected integers 0-7")
    return labels.astype(np.int64)


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    out = np.empty((len(images), *size, 3), np.uint8)
    for i, img in enumerate(images):
        img = np.clip(img, 0, 255).astype(np.uint8) if img.dtype != np.uint8 else img
        out[i] = np.asarray(Image.fromarray(img).resize(size[::-1], Image.LANCZOS))
    return out


# ---- cleaning ---------------------------------------------------------------------------------------

@dataclass
class CleaningReport:
    kept: int
    removed_repeated: int          # copies of an image that appears more than max_copies times
    removed_duplicate: int         # extra copies of a duplicated image (one copy kept)
    removed_conflicting: int       # every copy of a duplicate whose copies disagree on the label
    removed_not_a_smear: int       # single images whose colours are rare in blood smears
    rare_colour_threshold: float
    rare_colour_max_kept: float    # highest score among the kept images, to show the margin
    removed_indices: dict          # reason -> list of original indices

    def summary(self) -> str:
        return (f"cleaning: kept {self.kept}; removed {self.removed_repeated} repeated junk, "
                f"{self.removed_duplicate} duplicate copies, {self.removed_conflicting} conflicting duplicates, "
                f"{self.removed_not_a_smear} not-a-smear (rare-colour share > {self.rare_colour_threshold:.2f}; "
                f"highest kept {self.rare_colour_max_kept:.3f})")

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def image_hashes(images: np.ndarray) -> np.ndarray:
    return np.array([hashlib.sha1(img.tobytes()).hexdigest() for img in images])


def rare_colour_share(images: np.ndarray, floor: float = 1e-5, chunk: int = 1000,
                      subset: np.ndarray | None = None) -> np.ndarray:
    """Share of each image's pixels whose colour is rare among the pixels of all the other images (of `subset`,
    indices into images, when given: read a chunk at a time, as a copy of the subset would cost a second file's
    worth of memory).

    Smears are pale backgrounds with violet-stained cells; a cartoon, a photo or noise puts most of its pixels in
    colours that make up under `floor` of all smear pixels. Colours are binned 16 levels per channel, and each
    image is left out of the reference it is judged against, so one odd image cannot vouch for itself.
    """
    bins = 4096

    def codes_of(x):
        # Red and green's top 4 bits share one byte before widening to int32: fewer and narrower passes than
        # widening each channel to int64, which made this the slowest step of cleaning.
        red_green = (x[..., 0] & 0xF0) | (x[..., 1] >> 4)
        return ((red_green.astype(np.int32) << 4) | (x[..., 2] >> 4)).reshape(len(x), -1)

    def own_counts(x):
        codes = codes_of(x) + np.arange(len(x), dtype=np.int32)[:, None] * bins
        return np.bincount(codes.ravel(), minlength=len(x) * bins).reshape(len(x), bins)
    subset = np.arange(len(images)) if subset is None else np.asarray(subset)
    total = np.zeros(bins, np.int64)
    for start in range(0, len(subset), chunk):
        total += np.bincount(codes_of(images[subset[start:start + chunk]]).ravel(), minlength=bins)
    n_pixels = images.shape[1] * images.shape[2]
    others = max(total.sum() - n_pixels, 1)
    shares = np.empty(len(subset))
    for start in range(0, len(subset), chunk):
        own = own_counts(images[subset[start:start + chunk]])
        rare = (total[None, :] - own) / others < floor
        shares[start:start + chunk] = (own * rare).sum(1) / n_pixels
    return shares


def clean(images: np.ndarray, labels: np.ndarray, max_copies: int = 3,
          rare_colour_threshold: float = 0.25) -> tuple[np.ndarray, CleaningReport]:
    """Indices of the images to keep, by content: never by position in the file."""
    hashes = image_hashes(images)
    _, first, inverse, counts = np.unique(hashes, return_index=True, return_inverse=True, return_counts=True)
    removed: dict[str, list[int]] = {"repeated": [], "duplicate": [], "conflicting": [], "not_a_smear": []}
    keep = np.zeros(len(images), bool)
    for group in range(len(first)):
        members = np.flatnonzero(inverse == group) if counts[group] > 1 else [first[group]]
        if counts[group] > max_copies:
            removed["repeated"].extend(int(i) for i in members)
        elif counts[group] > 1 and len(set(labels[members].tolist())) > 1:
            removed["conflicting"].extend(int(i) for i in members)
        else:
            keep[members[0]] = True
            removed["duplicate"].extend(int(i) for i in members[1:])
    candidates = np.flatnonzero(keep)
    scores = rare_colour_share(images, subset=candidates) if len(candidates) else np.zeros(0)
    junk = scores > rare_colour_threshold
    keep[candidates[junk]] = False
    removed["not_a_smear"] = [int(i) for i in candidates[junk]]
    kept = np.flatnonzero(keep)
    report = CleaningReport(
        kept=len(kept), removed_repeated=len(removed["repeated"]), removed_duplicate=len(removed["duplicate"]),
        removed_conflicting=len(removed["conflicting"]), removed_not_a_smear=len(removed["not_a_smear"]),
        rare_colour_threshold=rare_colour_threshold,
        rare_colour_max_kept=float(scores[~junk].max()) if (~junk).any() else 0.0,
        removed_indices=removed)
    return kept, report


# ---- splits and balance -----------------------------------------------------------------------------

def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split indices into parts with the given fractions (the last part takes the rest), per class."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        edges = np.round(np.cumsum(fractions)[:-1] * len(idx)).astype(int)
        for p, chunk in enumerate(np.split(idx, edges)):
            parts[p].extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def train_val_test(labels: np.ndarray, val: float, test: float, seed: int, no_test_split: bool = False):
    """Indices of train, val and test; with no_test_split the test part joins train and test is empty."""
    train, val_idx, test_idx = stratified_split(labels, (1 - val - test, val, test), seed)
    if no_test_split:
        return np.sort(np.concatenate([train, test_idx])), val_idx, np.zeros(0, np.int64)
    return train, val_idx, test_idx


def kfold(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified K folds: (train, val) index pairs whose val parts cover every index once."""
    if k < 2:
        raise ValueError(f"--folds must be at least 2, got {k}")
    parts = stratified_split(labels, (1.0 / k,) * k, seed)
    return [(np.sort(np.concatenate(parts[:i] + parts[i + 1:])), parts[i]) for i in range(k)]


def class_weights(labels: np.ndarray) -> dict[int, float]:
    counts = np.bincount(labels, minlength=NUM_CLASSES).astype(np.float64)
    present = counts > 0
    weights = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)
    return {c: float(w) for c, w in enumerate(weights)}


def oversample(indices: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Repeat rare-class indices at random until every class has as many as the largest."""
    rng = np.random.default_rng(seed)
    by_class = [indices[labels[indices] == c] for c in range(NUM_CLASSES)]
    target = max(len(b) for b in by_class)
    out = [np.concatenate([b, rng.choice(b, target - len(b))]) for b in by_class if len(b)]
    return rng.permutation(np.concatenate(out))


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """About n indices with the class proportions of labels."""
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    return stratified_split(labels, (n / len(labels), 1 - n / len(labels)), seed)[0]
