"""The held-out corruptions and the declared split: what training may reach, and what it never does."""

import argparse

import numpy as np

from . import corrupt
from .config import CORRUPTION_FAMILIES
from .corrupt import _check_images, _param, _signs, _to_uint8

# ---------------------------------------------------------------- the declared split
#
# Training's augmentation (trainer/augment.py) by stage: {function there: (the suite's corruptions it can produce,
# the flags that switch it on)}. Every stage and corruption-stage op must be listed (tests/test_heldout.py checks
# it against corruption_ops() and the code), so whatever training learns is declared here. RandAugment is
# keras-cv's standard policy: auto-contrast, equalise, solarise, colour degeneration, contrast, brightness,
# shear and translation.
TRAINING_OPS = {
    "geometry": (("rotate", "flip", "zoom", "shift", "shear"),
                 "--flip --rot90 --rotation --zoom --shift --shear --black-fill"),
    "make_randaugment": (("brightness", "contrast", "saturation", "shear", "shift"), "--randaugment"),
    "colour": (("contrast", "brightness", "saturation", "hue", "gaussian_noise"),
               "--contrast --brightness --saturation --hue --noise-std"),
    "blur": (("gaussian_blur",), "--blur"),
    # A random colour matrix, and for kernels over 1 px random texture filtering with zero-mean weights: no blur.
    "randconv": (("channel_swap", "hue", "saturation"), "--randconv"),
    # Mixes of AugMix chains (auto-contrast, equalise, solarise, rotation, shear, translation); posterize, a
    # held-out kind, is left out of its ops. Blended shifted copies look a little like a ghosted blur.
    "augmix": (("contrast", "brightness", "rotate", "shear", "shift"), "--augmix"),
    # Opaque or (--erase-opacity under 1) translucent rectangles of noise or one colour; a pale translucent one
    # looks a little like the held-out bubble's veil, though square. --erase-shape blot cuts a ragged blob out of
    # the rectangle instead: larger than the held-out debris and opaque by default, but near it and MedMNIST-C's inks
    # (docs/robustness.md says so beside its figures).
    "erase": (("patches",), "--erase"),
    "mix": ((), "--mixup-alpha --cutmix-alpha"),  # blends two cells and their labels: no suite corruption
    # Blends in a random 1/f texture: no suite corruption by kind, though its darker blends look a little like
    # the held-out debris and grain (docs/robustness.md says so beside its figures).
    "pixmix": ((), "--pixmix --pixmix-weight"),
    # Another cell's Fourier amplitude under this cell's phase: another contrast, sharpness and grain (the
    # mottled backgrounds look a little like the held-out grain; docs/robustness.md says so beside its figures).
    "apr": (("contrast", "gaussian_blur", "gaussian_noise"), "--apr"),
    "patch_gaussian": (("gaussian_noise",), "--patch-gaussian"),  # i.i.d. noise, only inside a square
    # Light translucent blobs: brightness up and contrast down, over part of the cell. The nearest training op to
    # the held-out bubble's brighter inside and to MedMNIST-C's bubble (docs/robustness.md says so beside its figures).
    "veil": (("brightness", "contrast"), "--veil"),
    "_gaussian_noise": (("gaussian_noise",), "--corrupt"),
    "_salt_pepper": (("salt_pepper",), "--corrupt"),
    "_brightness": (("brightness",), "--corrupt"),
    "_contrast": (("contrast",), "--corrupt"),
    "_saturation": (("saturation",), "--corrupt"),
    "_hue": (("hue",), "--corrupt"),
    "_gamma": (("gamma",), "--corrupt"),
    "_channel_swap": (("channel_swap",), "--corrupt"),
    "_pixelate": (("pixelate",), "--corrupt"),
    "_grid_mask": (("grid_mask",), "--corrupt"),
    "_patches": (("patches",), "--corrupt"),
    "_jpeg": (("jpeg",), "--corrupt-jpeg"),
    "_zoom": (("zoom",), "--corrupt-zoom"),
    "_blur": (("gaussian_blur",), "--corrupt-blur"),
}
# The suite's corruptions that some profile or flag trains on: their scores are in-distribution.
SEEN_IN_TRAINING = tuple(name for name in corrupt.CORRUPTIONS
                         if any(name in kinds for kinds, _ in TRAINING_OPS.values()))
# The stages that mix families, flag by flag or (RandAugment) transform by transform, each with the suite
# corruptions it produces: --drop-family switches off only the part of a stage that belongs to the family.
# black_fill gives the black border the suite's rotate, zoom, shift and shear leave (corrupt._warp).
STAGE_FLAGS = {
    "flip": ("flip",), "rot90": ("flip",), "rotation": ("rotate",), "zoom": ("zoom",), "shift": ("shift",),
    "shear": ("shear",), "black_fill": ("rotate", "zoom", "shift", "shear"),
    "contrast": ("contrast",), "brightness": ("brightness",), "saturation": ("saturation",), "hue": ("hue",),
    "noise_std": ("gaussian_noise",), "blur": ("gaussian_blur",), "erase": ("patches",),
    "randconv": ("channel_swap", "hue", "saturation"), "augmix": ("contrast", "brightness", "rotate", "shear", "shift"),
    "apr": ("contrast", "gaussian_blur", "gaussian_noise"), "patch_gaussian": ("gaussian_noise",),
    "veil": ("brightness", "contrast"),
}
RANDAUGMENT_LAYERS = {  # keras-cv class: what it does to a cell, as the suite names it
    "AutoContrast": ("contrast",), "Equalization": ("contrast",), "Solarization": ("brightness",),
    "RandomColorDegeneration": ("saturation",), "RandomContrast": ("contrast",),
    "RandomBrightness": ("brightness",), "RandomShear": ("shear",), "RandomTranslation": ("shift",),
}


def families_of(kinds) -> set:
    """The corruption families that these suite corruptions belong to."""
    return {corrupt.FAMILY_OF[kind] for kind in kinds}

# ---------------------------------------------------------------- parameters per severity 1..5
# As in trainer/corrupt.py: 3 should stay readable for an expert, 5 only barely. Lengths are for 96 px images
# and scale with the shorter side.
BANDING_STD = (3, 5, 8, 12, 18)  # std of the row and column offsets, 0-255 units
GRAIN_STD = (0.03, 0.05, 0.075, 0.105, 0.14)  # std of the multiplicative grain, fraction of the pixel value
GRAIN_SIGMA = 0.8  # px: the grain's clump size
ASTIGMATIC_SIGMA = (1.0, 1.5, 2.1, 2.8, 3.6)  # px, std along the long axis of the blur
ASTIGMATIC_RATIO = 0.25  # short axis / long axis
FIELD_BLUR_SIGMA = (1.0, 1.6, 2.3, 3.1, 4.0)  # px, std at the crop's far side from the optical axis
STAIN_CHANGE = (0.2, 0.35, 0.5, 0.7, 0.9)  # most a dye's amount grows or shrinks by, fraction
WHITE_BALANCE = (0.1, 0.18, 0.27, 0.38, 0.5)  # log gain along the warm-cool axis, linear light
ELASTIC_PIXELS = (1.0, 1.7, 2.5, 3.5, 4.8)  # RMS displacement
ELASTIC_SMOOTHNESS = 8.0  # px, std of the Gaussian that smooths the displacement field
BARREL_K = (0.08, 0.15, 0.24, 0.35, 0.5)  # radial distortion at the corners (r = 1)
POSTERIZE_LEVELS = (32, 20, 14, 10, 7)  # grey levels per channel
CHROMA_FACTOR = (3, 5, 8, 12, 16)  # colour kept at 1/factor of the resolution on each axis
DEBRIS_COUNT = (1, 2, 3, 4, 6)
DEBRIS_RADIUS = (0.035, 0.045, 0.055, 0.065, 0.075)  # of the side
SCRATCH_COUNT = (1, 1, 2, 2, 3)
SCRATCH_WIDTH = (0.8, 1.1, 1.5, 2.0, 2.6)  # px
VIGNETTE_DEPTH = (0.3, 0.5, 0.75, 1.0, 1.3)  # illumination from 1 + depth/2 (near side) to 1 - depth/2 (far side)
BUBBLE_RADIUS = (0.16, 0.22, 0.28, 0.35, 0.42)  # of the side
BUBBLE_RIM = (0.3, 0.4, 0.5, 0.6, 0.7)  # share of light the rim blocks
BUBBLE_MAGNIFY = (0.04, 0.06, 0.09, 0.12, 0.15)  # lens effect at the centre
PRECIPITATE_COUNT = (6, 12, 22, 36, 55)  # granules per image

# Stain vectors (optical density per R, G, B) of haematoxylin, eosin and DAB, from Ruifrok and Johnston,
# "Quantification of histochemical staining by color deconvolution", Anal. Quant. Cytol. Histol. 23 (2001).
# Blood smears carry Romanowsky dyes instead (azure/methylene blue and eosin); haematoxylin stands in for the
# blue-purple one, whose absorption it resembles; the third vector absorbs whatever neither dye explains.
STAIN_VECTORS = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]], np.float32)
STAIN_VECTORS /= np.linalg.norm(STAIN_VECTORS, axis=1, keepdims=True)
SRGB_GAMMA = 2.2  # light adds up in linear light; pixels are stored with this gamma (approximately sRGB)


def _scale(images):
    """Lengths in the tables are for 96 px; this is the factor for these images."""
    return min(images.shape[1:3]) / 96


def _fold(index, n):
    """Mirror indices into 0..n-1 (the edge pixel repeated), as np.pad's 'symmetric' does."""
    index = np.mod(index, 2 * n)
    return np.where(index >= n, 2 * n - 1 - index, index)


def _blur_matrix(n, sigma):
    """(n, n) matrix whose product with a column blurs it with a Gaussian of this sigma, borders mirrored."""
    radius = int(np.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    matrix = np.zeros((n, n), np.float32)
    np.add.at(matrix, (np.repeat(np.arange(n), len(offsets)), _fold(np.arange(n)[:, None] + offsets, n).ravel()),
              np.tile(taps / taps.sum(), n))
    return matrix


def _separable(x, rows, cols):
    """rows @ plane @ cols.T for every plane of a float batch (N, H, W, C): a blur or a resampling along each axis.

    Two large matrix products with the batch folded into one side. numpy's batched matmul would instead make one
    BLAS call per image row, and tens of thousands of small threaded calls ran 10-50x slower on a busy machine.
    """
    n, h, w, c = x.shape
    along_w = (x.transpose(0, 1, 3, 2).reshape(-1, w) @ cols.T).reshape(n, h, c, -1)  # (N, H, C, W')
    along_h = rows @ along_w.transpose(1, 0, 2, 3).reshape(h, -1)  # (H', N * C * W')
    return np.ascontiguousarray(along_h.reshape(-1, n, c, cols.shape[0]).transpose(1, 0, 3, 2))


def _mix_channels(x, matrix):
    """x @ matrix over the last axis of (N, H, W, 3). einsum's own loop: `@` makes one BLAS call per image row,
    and even a single call with an inner size of 3 ran 5x slower than this."""
    return np.einsum("nhwc,cd->nhwd", x, matrix.astype(np.float32))


def _blur(x, sigma):
    """Gaussian blur of a float batch (N, H, W, C), borders mirrored."""
    return _separable(x, _blur_matrix(x.shape[1], sigma), _blur_matrix(x.shape[2], sigma))


def _grid(images):
    """Row and column coordinates (H, W) of the pixels, measured from the image centre."""
    h, w = images.shape[1:3]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return ys - (h - 1) / 2, xs - (w - 1) / 2


def _remap(images, src_y, src_x):
    """Bilinear resampling, float: output pixel (i, j) of image n reads images[n] at (src_y, src_x)[n, i, j], in
    pixel coordinates; reads past the border are mirrored, so no black edges appear (those are training's)."""
    n, h, w, _ = images.shape
    src_y, src_x = np.asarray(src_y, np.float32), np.asarray(src_x, np.float32)
    y0, x0 = np.floor(src_y), np.floor(src_x)
    fy, fx = (src_y - y0)[..., None], (src_x - x0)[..., None]
    y0, x0 = y0.astype(np.int32), x0.astype(np.int32)
    # One flat index per corner into (N*H*W, 3): a single take is several times faster than 3-D fancy indexing.
    base = (np.arange(n, dtype=np.int32) * h)[:, None, None]
    rows = [(base + _fold(y0 + d, h)) * w for d in (0, 1)]
    cols = [_fold(x0 + d, w) for d in (0, 1)]
    flat = images.reshape(-1, 3)

    def read(dy, dx):
        return flat.take(rows[dy] + cols[dx], axis=0).astype(np.float32)
    top, bottom = read(0, 0), read(1, 0)
    top += (read(0, 1) - top) * fx
    bottom += (read(1, 1) - bottom) * fx
    return top + (bottom - top) * fy


def _far_point(images, rng, low, high):
    """A point per image (N, 1, 1) pairs, at low..high times the shorter side from the centre, random direction:
    the optical axis or lamp centre of a field of view of which the crop is one corner."""
    n = len(images)
    distance = rng.uniform(low, high, (n, 1, 1)) * min(images.shape[1:3])
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    return distance * np.sin(angle), distance * np.cos(angle)


def _ramp(images, rng):
    """Per image (N, H, W): squared distance from a far point, scaled to 0 at the nearest pixel and 1 at the
    farthest; the shape of lens fall-off across a crop taken off the centre of the field."""
    ys, xs = _grid(images)
    cy, cx = _far_point(images, rng, 0.6, 1.2)
    d2 = (ys - cy) ** 2 + (xs - cx) ** 2
    low, high = d2.min(axis=(1, 2), keepdims=True), d2.max(axis=(1, 2), keepdims=True)
    return (d2 - low) / (high - low)


# ---------------------------------------------------------------- noise

def banding(images, severity, rng):
    """Row and column offsets: the fixed-pattern readout noise of a CMOS camera, mostly grey, partly per colour."""
    n, h, w, _ = images.shape
    std = _param(BANDING_STD, severity)

    def offsets(shape):  # unit variance: 0.8^2 + 0.6^2 = 1
        return 0.8 * rng.normal(size=shape[:3] + (1,)) + 0.6 * rng.normal(size=shape)
    share = rng.random((n, 1, 1, 1))  # how much runs along rows rather than columns
    rows, cols = offsets((n, h, 1, 3)), offsets((n, 1, w, 3))
    return _to_uint8(images + std * (np.sqrt(share) * rows + np.sqrt(1 - share) * cols))


def grain(images, severity, rng):
    """Multiplicative luminance grain in clumps of about two pixels (sensor crosstalk, film grain): unlike i.i.d.
    Gaussian noise it is spatially correlated, equal in the three channels, and strongest on the bright background."""
    field = _blur(rng.standard_normal(images.shape[:3] + (1,), dtype=np.float32), GRAIN_SIGMA)
    field /= field.std(axis=(1, 2, 3), keepdims=True) + 1e-6
    return _to_uint8(images * (1 + _param(GRAIN_STD, severity) * field))


# ---------------------------------------------------------------- blur

def astigmatic_blur(images, severity, rng):
    """Anisotropic Gaussian blur along a random axis (astigmatism, a tilted slide), applied in the Fourier domain,
    where an oriented Gaussian is one exponential per frequency."""
    n, h, w, _ = images.shape
    long = _param(ASTIGMATIC_SIGMA, severity) * _scale(images)
    short = long * ASTIGMATIC_RATIO
    pad = int(np.ceil(3 * long)) + 1  # mirrored margin, so the transform's wrap-around never shows
    x = np.pad(images.astype(np.float32), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    fy = np.fft.fftfreq(x.shape[1]).astype(np.float32)[None, :, None]
    fx = np.fft.rfftfreq(x.shape[2]).astype(np.float32)[None, None, :]
    angle = rng.uniform(0, np.pi, (n, 1, 1)).astype(np.float32)
    along, across = fx * np.cos(angle) + fy * np.sin(angle), fy * np.cos(angle) - fx * np.sin(angle)
    transfer = np.exp(-2 * np.pi ** 2 * (long ** 2 * along ** 2 + short ** 2 * across ** 2)).astype(np.float32)
    spectrum = np.fft.rfft2(x, axes=(1, 2)) * transfer[..., None]
    out = np.fft.irfft2(spectrum, s=x.shape[1:3], axes=(1, 2))
    return _to_uint8(out[:, pad:pad + h, pad:pad + w])


def field_blur(images, severity, rng):
    """Blur that grows across the crop (field curvature): the crop is a corner of a field of view whose edge is out
    of focus, so one side stays sharp and the other is blurred with up to the table's sigma."""
    sigma = _param(FIELD_BLUR_SIGMA, severity) * _scale(images)
    x = images.astype(np.float32)
    t = 2 * _ramp(images, rng)[..., None].astype(np.float32)  # 0 sharp, 1 half the blur, 2 all of it
    sharp, blurred = np.clip(1 - t, 0, 1), np.clip(t - 1, 0, 1)
    return _to_uint8(sharp * x + (1 - sharp - blurred) * _blur(x, sigma / 2) + blurred * _blur(x, sigma))


# ---------------------------------------------------------------- colour

def stain_shift(images, severity, rng):
    """Over- or under-staining: each dye's amount is scaled in optical density (Beer-Lambert), the way a stain
    batch, staining time or fading change a smear, so nuclei, granules and red cells shift in different ways."""
    od = -np.log10((images.astype(np.float32) + 1) / 256)
    amounts = _mix_channels(od, np.linalg.inv(STAIN_VECTORS))  # per pixel: how much of each dye
    change = _param(STAIN_CHANGE, severity) * rng.uniform(0.5, 1, (len(images), 1, 1, 2))
    signs = rng.choice(np.array([-1, 1], np.float32), size=change.shape)
    amounts[..., :2] *= 1 + signs * change  # the two dyes; the residual is left as it was
    return _to_uint8(256 * 10 ** -_mix_channels(amounts, STAIN_VECTORS) - 1)


WARM = np.array([1, 0, -1], np.float32) / np.sqrt(2)  # red up, blue down: a colder lamp or a tungsten one
TINT = np.array([-1, 2, -1], np.float32) / np.sqrt(6)  # green against magenta


def white_balance(images, severity, rng):
    """A colour cast from a lamp or camera white balance set wrong: per-channel gains in linear light, mostly along
    the warm-cool axis. The white background turns colour too, which no training colour op does."""
    n = len(images)
    tilt = rng.normal(0, 0.35, (n, 1))  # mostly warm-cool, a little green-magenta
    direction = np.cos(tilt) * WARM + np.sin(tilt) * TINT
    gains = np.exp(_param(WHITE_BALANCE, severity) * _signs(rng, n).reshape(n, 1) * direction)
    return _to_uint8(images * (gains ** (1 / SRGB_GAMMA)).reshape(n, 1, 1, 3).astype(np.float32))


# ---------------------------------------------------------------- geometry

def elastic(images, severity, rng):
    """A smooth random displacement field (a smear that stretched cells, a wobbling stage): Gaussian-smoothed noise,
    after Simard et al., "Best practices for convolutional neural networks applied to visual document analysis",
    ICDAR 2003."""
    n, h, w, _ = images.shape
    field = _blur(rng.standard_normal((n, h, w, 2), dtype=np.float32), ELASTIC_SMOOTHNESS * _scale(images))
    field *= _param(ELASTIC_PIXELS, severity) * _scale(images) / np.sqrt((field ** 2).mean(axis=(1, 2, 3),
                                                                                          keepdims=True) * 2)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return _to_uint8(_remap(images, ys + field[..., 0], xs + field[..., 1]))


def barrel(images, severity, rng):
    """Radial lens distortion, barrel or pincushion, around a point near the centre: r' = r (1 + k r^2), r = 1 at
    the corners."""
    n, h, w, _ = images.shape
    k = _param(BARREL_K, severity) * _signs(rng, n).reshape(n, 1, 1)
    ys, xs = _grid(images)
    cy, cx = _far_point(images, rng, 0.0, 0.1)
    dy, dx = ys - cy, xs - cx
    stretch = 1 + k * (dy ** 2 + dx ** 2) / ((h / 2) ** 2 + (w / 2) ** 2)
    return _to_uint8(_remap(images, cy + dy * stretch + (h - 1) / 2, cx + dx * stretch + (w - 1) / 2))


# ---------------------------------------------------------------- compression

def posterize(images, severity, rng):
    """Too few grey levels per channel (a low bit-depth camera, an 8-colour palette export): flat bands and
    contours where the cytoplasm's shading was."""
    step = 255 / (_param(POSTERIZE_LEVELS, severity) - 1)
    return _to_uint8(np.rint(images / step) * step)


# BT.601 full-range RGB to YCbCr (JFIF), with the offsets left out: only the colour planes are resampled.
YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32)


def _subsample_matrix(n, factor):
    """(n, n): average blocks of `factor` pixels, then interpolate linearly between the block centres, as a
    decoder's upsampling does."""
    blocks = -(-n // factor)
    down = np.zeros((blocks, n), np.float32)
    down[np.arange(n) // factor, np.arange(n)] = 1
    down /= down.sum(axis=1, keepdims=True)
    centres = (np.arange(blocks) * factor + np.minimum(np.arange(1, blocks + 1) * factor, n) - 1) / 2
    position = np.clip(np.interp(np.arange(n), centres, np.arange(blocks)), 0, blocks - 1)
    low = np.minimum(np.floor(position).astype(int), max(blocks - 2, 0))
    frac = (position - low).astype(np.float32)
    up = np.zeros((n, blocks), np.float32)
    up[np.arange(n), low] = 1 - frac
    up[np.arange(n), np.minimum(low + 1, blocks - 1)] += frac
    return up @ down


def chroma_subsample(images, severity, rng):
    """Colour stored at 1/3 to 1/12 of the resolution (heavy chroma subsampling in video and WebP-style codecs):
    brightness stays sharp while colour bleeds across the cell's edges and granules lose their tint."""
    factor = _param(CHROMA_FACTOR, severity)
    ycc = _mix_channels(images.astype(np.float32), YCBCR.T)
    rows, cols = _subsample_matrix(images.shape[1], factor), _subsample_matrix(images.shape[2], factor)
    ycc[..., 1:] = _separable(ycc[..., 1:], rows, cols)
    return _to_uint8(_mix_channels(ycc, np.linalg.inv(YCBCR).T))


# ---------------------------------------------------------------- occlusion

def debris(images, severity, rng):
    """Dust and debris: dark irregular blobs, sharp or soft depending on the layer they lie in, half-transparent."""
    n = len(images)
    ys, xs = _grid(images)
    h, w = images.shape[1:3]
    out = images.astype(np.float32)

    def draw(low, high, shape=(n, 1, 1)):  # float32 throughout: float64 draws would double every pixel-wise step
        return rng.uniform(low, high, shape).astype(np.float32)
    for _ in range(_param(DEBRIS_COUNT, severity)):
        dy, dx = ys - draw(-h / 2, h / 2), xs - draw(-w / 2, w / 2)
        r = np.sqrt(dy ** 2 + dx ** 2) + np.float32(1e-6)
        cos, sin = dx / r, dy / r
        # An irregular outline: the radius wobbles with the angle (2- and 3-fold harmonics, random amplitudes).
        cos2, sin2 = cos ** 2 - sin ** 2, 2 * sin * cos
        wobble = (draw(-0.25, 0.25) * cos2 + draw(-0.25, 0.25) * sin2
                  + draw(-0.15, 0.15) * (cos * cos2 - sin * sin2) + draw(-0.15, 0.15) * (sin * cos2 + cos * sin2))
        edge = np.float32(_param(DEBRIS_RADIUS, severity) * min(h, w)) * draw(0.6, 1.4) * (1 + wobble)
        softness = draw(0.5, 2.5)  # px: in focus or in another plane
        cover = np.clip((edge - r) / softness + 0.5, 0, 1) * draw(0.6, 0.95)
        colour = draw(25, 90, (n, 1, 1, 1)) + draw(-10, 10, (n, 1, 1, 3))  # grey to brown
        out += (colour - out) * cover[..., None]
    return _to_uint8(out)


def scratch(images, severity, rng):
    """Cover-slip scratches and fibres: thin slightly curved lines across the crop, dark (most) or bright."""
    n = len(images)
    ys, xs = _grid(images)
    side = min(images.shape[1:3])
    out = images.astype(np.float32)
    for _ in range(_param(SCRATCH_COUNT, severity)):
        angle = rng.uniform(0, np.pi, (n, 1, 1))
        u = xs * np.cos(angle) + ys * np.sin(angle)
        v = ys * np.cos(angle) - xs * np.sin(angle)
        offset = rng.uniform(-0.35, 0.35, (n, 1, 1)) * side
        bend = rng.uniform(-4, 4, (n, 1, 1)) / side ** 2  # sag of up to 1 px per 1/4 side from the middle, squared
        distance = np.abs(v - offset - bend * u ** 2) / np.sqrt(1 + (2 * bend * u) ** 2)
        width = _param(SCRATCH_WIDTH, severity) * _scale(images) * rng.uniform(0.8, 1.2, (n, 1, 1))
        line = np.clip(width / 2 + 0.5 - distance, 0, 1) * rng.uniform(0.6, 0.95, (n, 1, 1))
        shade = np.where(rng.random((n, 1, 1, 1)) < 0.75, rng.uniform(20, 80, (n, 1, 1, 1)), 250.0)
        out += (shade - out) * line[..., None].astype(np.float32)
    return _to_uint8(out)


# ---------------------------------------------------------------- microscopy

def vignetting(images, severity, rng):
    """Uneven illumination (a lamp or condenser off centre): light falls across the crop from 1 + depth/2 on the
    side nearest the lamp's axis to 1 - depth/2 on the far side, in linear light, exposure kept on average."""
    light = 1 + _param(VIGNETTE_DEPTH, severity) * (0.5 - _ramp(images, rng))
    return _to_uint8(images * (np.maximum(light, 0.05) ** (1 / SRGB_GAMMA))[..., None].astype(np.float32))


def bubble(images, severity, rng):
    """An air bubble in the mounting medium: a dark refracting rim, and inside it the cell magnified a little and
    lit a little more, like through a weak lens."""
    n = len(images)
    h, w = images.shape[1:3]
    ys, xs = _grid(images)
    radius = _param(BUBBLE_RADIUS, severity) * min(h, w) * rng.uniform(0.85, 1.15, (n, 1, 1))
    cy, cx = rng.uniform(-h / 2, h / 2, (n, 1, 1)), rng.uniform(-w / 2, w / 2, (n, 1, 1))
    dy, dx = ys - cy, xs - cx
    r = np.sqrt(dy ** 2 + dx ** 2) / radius
    shrink = np.where(r < 1, 1 - _param(BUBBLE_MAGNIFY, severity) * (1 - r ** 2), 1)  # reads nearer the centre
    out = _remap(images, cy + dy * shrink + (h - 1) / 2, cx + dx * shrink + (w - 1) / 2)
    rim_width = (1.0 + 0.5 * severity) * _scale(images) / radius  # in units of the radius
    rim = np.exp(-(((r - 1) / rim_width) ** 2))
    light = (1 - _param(BUBBLE_RIM, severity) * rim) * np.where(r < 1, 1.08, 1)
    return _to_uint8(out * light[..., None].astype(np.float32))


def stain_precipitate(images, severity, rng):
    """Precipitated stain: clusters of small dark purple granules on top of the smear, as Romanowsky stains leave
    when they dry or are not filtered; they look like platelets or granules, and that is the damage."""
    n, h, w, _ = images.shape
    count = _param(PRECIPITATE_COUNT, severity)
    clusters = rng.integers(1, 4, (n, 1))
    which = (rng.random((n, count)) * clusters).astype(np.intp)[..., None]  # the cluster each granule is in
    centres = rng.uniform(0, 1, (n, 3, 2)) * [h, w]
    spread = rng.uniform(0.05, 0.15, (n, 3, 1)) * min(h, w)
    at = (np.take_along_axis(centres, which, axis=1)
          + np.take_along_axis(spread, which, axis=1) * rng.standard_normal((n, count, 2)))
    loose = rng.random((n, count)) < 0.3  # some granules lie alone anywhere
    at = np.where(loose[..., None], rng.uniform(0, 1, (n, count, 2)) * [h, w], at)
    rows = np.clip(np.rint(at[..., 0]), 0, h - 1).astype(np.intp)
    cols = np.clip(np.rint(at[..., 1]), 0, w - 1).astype(np.intp)
    large = rng.random((n, count)) < 0.35
    density = np.zeros((n, h, w, 1), np.float32)
    for sigma, pick in ((0.6, ~large), (1.2, large)):
        sigma *= _scale(images)
        dots = np.zeros((n, h, w, 1), np.float32)
        peak = rng.uniform(0.6, 1.4, (n, count)) * 2 * np.pi * sigma ** 2  # optical density at a granule's centre
        batch = np.broadcast_to(np.arange(n)[:, None], (n, count))
        np.add.at(dots, (batch[pick], rows[pick], cols[pick], 0), peak[pick])
        density += _blur(dots, sigma)
    return _to_uint8(images * 10 ** -(density * STAIN_VECTORS[0]))


# ---------------------------------------------------------------- registry

# (name, family, function) in the order an image meets them: the stained smear and what lies on the slide, the
# optics, the light, the sensor, then storage. A held-out mix applies an image's corruptions in this order.
REGISTRY = (
    ("stain_shift", "colour", stain_shift),
    ("stain_precipitate", "microscopy", stain_precipitate),
    ("bubble", "microscopy", bubble),
    ("debris", "occlusion", debris),
    ("scratch", "occlusion", scratch),
    ("elastic", "geometry", elastic),
    ("barrel", "geometry", barrel),
    ("motion_blur", "blur", corrupt.motion_blur),
    ("defocus_blur", "blur", corrupt.defocus_blur),
    ("astigmatic_blur", "blur", astigmatic_blur),
    ("field_blur", "blur", field_blur),
    ("vignetting", "microscopy", vignetting),
    ("white_balance", "colour", white_balance),
    ("shot_noise", "noise", corrupt.shot_noise),
    ("grain", "noise", grain),
    ("banding", "noise", banding),
    ("chroma_subsample", "compression", chroma_subsample),
    ("posterize", "compression", posterize),
)
HELD_OUT = tuple(name for name, _, _ in REGISTRY)
CORRUPTIONS = {name: function for name, _, function in REGISTRY}
FAMILY_OF = {name: family for name, family, _ in REGISTRY}
FAMILIES = {family: tuple(name for name in HELD_OUT if FAMILY_OF[name] == family) for family in CORRUPTION_FAMILIES}


def apply(images, name, severity, rng):
    """Apply one held-out corruption at severity 0-5 to a uint8 batch (N, H, W, 3); returns a new uint8 array."""
    return corrupt.apply(images, name, severity, rng, CORRUPTIONS)


def corrupt_mix(images, seed=0, min_k=1, max_k=3, severities=(1, 5)):
    """The held-out corrupted copy: each image gets k in [min_k, max_k] distinct held-out corruptions at random
    severities. Returns the copy and, per image, the (name, severity) list in the order applied."""
    return corrupt.corrupt_mix(images, seed, min_k, max_k, severities, CORRUPTIONS)


def preview_rows(cell, severities=(1, 3, 5), seed=0):
    """[(name, family, [cell at each severity])] for every held-out corruption, all on the same cell (H, W, 3)."""
    batch = _check_images(np.asarray(cell)[None])
    return [(name, FAMILY_OF[name], [apply(batch, name, s, np.random.default_rng(seed))[0] for s in severities])
            for name in HELD_OUT]


# ---------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m trainer corrupt --heldout",
        description="The held-out corruptions, which no training setting reaches: write a held-out corrupted copy "
                    "of an .npz (IN OUT), or draw each one on a cell (--preview).")
    parser.add_argument("--heldout", action="store_true", help="(selects this command)")
    parser.add_argument("input", nargs="?", help=".npz with 'images' uint8 (N, H, W, 3) and optional 'labels'")
    parser.add_argument("output", nargs="?", help="where to write the held-out corrupted .npz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-k", type=int, default=1, help="fewest corruptions per image")
    parser.add_argument("--max-k", type=int, default=3, help="most corruptions per image")
    parser.add_argument("--preview", metavar="PNG", help="draw every held-out corruption at severities 1, 3 and 5 "
                        "on one cell of --data instead")
    parser.add_argument("--data", default="data/training_set.npz", help="the .npz --preview takes its cell from")
    parser.add_argument("--cell", type=int, default=0, help="index of the cell --preview draws on")
    args = parser.parse_args(argv)
    if args.preview:
        from . import plots
        images, _ = corrupt._load(args.data)
        if not 0 <= args.cell < len(images):
            corrupt._fail(f"--cell {args.cell} is outside {args.data}'s {len(images)} images")
        plots.corruption_preview(images[args.cell], preview_rows(images[args.cell], seed=args.seed), args.preview)
        print(f"corrupt: wrote {args.preview} ({len(HELD_OUT)} held-out corruptions at severities 1, 3, 5 on image "
              f"{args.cell} of {args.data})")
        return
    if not (args.input and args.output):
        corrupt._fail("give IN.npz OUT.npz to write a held-out corrupted copy, or --preview out.png")
    if not 0 <= args.min_k <= args.max_k <= len(HELD_OUT):
        corrupt._fail(f"need 0 <= --min-k <= --max-k <= {len(HELD_OUT)}, got {args.min_k} and {args.max_k}")
    images, labels = corrupt._load(args.input)
    corrupted, recipes = corrupt_mix(images, seed=args.seed, min_k=args.min_k, max_k=args.max_k)
    corrupt._save_atomically(args.output, {"images": corrupted, **({} if labels is None else {"labels": labels})})
    counts = {name: sum(step[0] == name for recipe in recipes for step in recipe) for name in HELD_OUT}
    summary = " ".join(f"{name}={count}" for name, count in counts.items() if count)
    print(f"corrupt: wrote {len(images)} held-out corrupted images to {args.output} (seed {args.seed}, "
          f"k {args.min_k}-{args.max_k}): {summary or 'none'}")
