"""The seven test-set corruptions of AdaMerging's robustness study (Table 4, Fig. 6).

Motion blur, impulse noise, gaussian noise, pixelate, spatter, contrast and JPEG compression, after
ImageNet-C (Hendrycks & Dietterich, ICLR 2019), written with numpy, scipy, scikit-image and PIL
(no torchvision, no ``imagecorruptions``) so they run on the CPU install.

Images are ``[H, W]``, ``[H, W, C]`` or a batch ``[N, H, W, C]``, either ``uint8`` in [0, 255] or
floating in [0, 1]; the output has the input's shape, dtype and range. ``severity`` is 1 (mild) to
5 (harsh). Every random draw comes from ``seed``, the image's index in the batch and the
corruption's name, so an image is corrupted the same way whatever batch it sits in (``start``
gives the index of a batch's first image, so a test set corrupted in chunks matches one call).

Parameters follow image size. Spatial ones (blur length, pixel cells, spatter blob size) scale with
the side length from ImageNet-C's 224-px values. The others (noise level, contrast factor, JPEG
quality) use ImageNet-C's values from 128 px up, and milder values below, in the spirit of
CIFAR-10-C: on a 32-px miniature, ImageNet-C's severity 5 leaves almost no signal. The small-image
values are this book's choice; the chapter says so.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

CORRUPTIONS = ("motion_blur", "impulse_noise", "gaussian_noise", "pixelate", "spatter", "contrast", "jpeg")
# the names AdaMerging's Table 4 prints (book/paper_tables: "4:<name>")
PAPER_NAMES = {
    "motion_blur": "Motion Blur", "impulse_noise": "Impulse Noise", "gaussian_noise": "Gaussian Noise",
    "pixelate": "Pixelate", "spatter": "Spatter", "contrast": "Contrast", "jpeg": "JPEG Compression",
}
SMALL = 128  # below this side length the milder (CIFAR-10-C-like) levels apply

# severity 1..5; (ImageNet-C, small images)
GAUSSIAN_STD = {"large": (0.08, 0.12, 0.18, 0.26, 0.38), "small": (0.04, 0.06, 0.08, 0.09, 0.10)}
IMPULSE_AMOUNT = {"large": (0.03, 0.06, 0.09, 0.17, 0.27), "small": (0.01, 0.02, 0.03, 0.05, 0.07)}
CONTRAST_FACTOR = {"large": (0.4, 0.3, 0.2, 0.1, 0.05), "small": (0.75, 0.5, 0.4, 0.3, 0.15)}
JPEG_QUALITY = {"large": (25, 18, 15, 10, 7), "small": (80, 65, 58, 50, 40)}
# fraction of the side kept by pixelate (ImageNet-C's PIL resize factor; it is scale-free)
PIXELATE_FACTOR = {"large": (0.6, 0.5, 0.4, 0.3, 0.25), "small": (0.95, 0.9, 0.85, 0.75, 0.65)}
# motion blur (radius, sigma) in pixels at 224 px, scaled by side/224
MOTION_BLUR_224 = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))
# spatter: (fraction of the image covered, blob sigma at 224 px, opacity, mud?)
SPATTER = ((0.06, 4.0, 0.6, False), (0.09, 3.0, 0.6, False), (0.12, 2.0, 0.5, False),
           (0.16, 1.5, 0.8, True), (0.22, 1.0, 0.9, True))
WATER, MUD = np.array([0.63, 0.75, 0.87]), np.array([0.35, 0.25, 0.15])


# ------------------------------------------------------------------------------------------ helpers
def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or int(severity) != severity or not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be an integer from 1 (mild) to 5 (harsh), got {severity!r}")
    return int(severity)


def _scale(side: int) -> str:
    return "small" if side < SMALL else "large"


def _to_float(img: np.ndarray) -> tuple[np.ndarray, np.dtype]:
    """[H, W, C] float64 in [0, 1], and the dtype to return."""
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0, a.dtype
    if np.issubdtype(a.dtype, np.floating):
        if a.size and (np.nanmin(a) < -1e-6 or np.nanmax(a) > 1 + 1e-6):
            raise ValueError(f"float images must lie in [0, 1] (got values in [{a.min():.3g}, {a.max():.3g}]); "
                             "corrupt raw images before normalising them for the encoder")
        return a.astype(np.float64), a.dtype
    raise TypeError(f"images must be uint8 in [0, 255] or float in [0, 1], got dtype {a.dtype}")


def _back(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    if dtype == np.uint8:
        return np.round(x * 255.0).astype(np.uint8)
    return x.astype(dtype)


def _rng(seed: int, index: int, name: str) -> np.random.Generator:
    # the name enters the seed so that, say, gaussian and impulse noise never share their draws
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), zlib.crc32(name.encode())]))


def _per_image(fn: Callable[[np.ndarray, int, np.random.Generator], np.ndarray], name: str) -> Callable:
    """Lift ``fn(float [H, W, C], severity, rng) -> float`` to the public signature."""

    def apply(images: np.ndarray, severity: int = 3, seed: int = 0, start: int = 0) -> np.ndarray:
        severity = _check_severity(severity)
        a = np.asarray(images)
        if a.ndim == 2:
            return apply(a[..., None], severity, seed, start)[..., 0]
        if a.ndim == 3:
            if a.shape[-1] not in (1, 3):
                raise ValueError(f"expected [H, W, C] with C = 1 or 3 (channels last), got shape {a.shape}; "
                                 "a channels-first array needs .transpose(1, 2, 0) first")
            x, dtype = _to_float(a)
            return _back(fn(x, severity, _rng(seed, start, name)), dtype)
        if a.ndim == 4:
            if a.shape[-1] not in (1, 3):
                raise ValueError(f"expected a batch [N, H, W, C] with C = 1 or 3 (channels last), got shape "
                                 f"{a.shape}; a channels-first batch needs .transpose(0, 2, 3, 1) first")
            x, dtype = _to_float(a)
            out = np.empty_like(x)
            for i in range(x.shape[0]):
                out[i] = fn(x[i], severity, _rng(seed, start + i, name))
            return _back(out, dtype)
        raise ValueError(f"images must be [H, W], [H, W, C] or [N, H, W, C]; got shape {a.shape}")

    apply.__name__ = name
    return apply


# -------------------------------------------------------------------------------------- corruptions
def _gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    std = GAUSSIAN_STD[_scale(min(x.shape[:2]))][severity - 1]
    return x + rng.normal(0.0, std, size=x.shape)


def _impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    # salt and pepper on each value independently, as skimage.util.random_noise(mode="s&p") does
    amount = IMPULSE_AMOUNT[_scale(min(x.shape[:2]))][severity - 1]
    u = rng.random(x.shape)
    out = x.copy()
    out[u < amount / 2] = 0.0
    out[(u >= amount / 2) & (u < amount)] = 1.0
    return out


def _contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = CONTRAST_FACTOR[_scale(min(x.shape[:2]))][severity - 1]
    means = x.mean(axis=(0, 1), keepdims=True)  # per channel, as ImageNet-C
    return (x - means) * c + means


def _cells(n: int, factor: float) -> np.ndarray:
    """Start index of each pixelate cell along a side of ``n`` pixels: pixel i is in cell ⌊i·k/n⌋."""
    k = min(n, max(1, int(round(n * factor))))
    return -(-np.arange(k) * n // k)  # ceil(j n / k), exact in integers


def _pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    # box-average onto a coarser grid, then blow each cell back up (PIL BOX down, NEAREST up)
    factor = PIXELATE_FACTOR[_scale(min(x.shape[:2]))][severity - 1]
    rows, cols = _cells(x.shape[0], factor), _cells(x.shape[1], factor)
    sums = np.add.reduceat(np.add.reduceat(x, rows, axis=0), cols, axis=1)
    h = np.diff(np.append(rows, x.shape[0]))
    w = np.diff(np.append(cols, x.shape[1]))
    means = sums / (h[:, None, None] * w[None, :, None])
    return np.repeat(np.repeat(means, h, axis=0), w, axis=1)


def motion_kernel(radius: float, sigma: float, angle: float) -> np.ndarray:
    """A one-sided line kernel (sums to 1): Gaussian weights along ``angle`` degrees, like ImageMagick's."""
    r = max(float(radius), 0.5)
    size = 2 * int(np.ceil(r)) + 1
    k = np.zeros((size, size))
    c = size // 2
    t = np.linspace(0.0, r, max(2, int(np.ceil(4 * r)) + 1))
    w = np.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    dx, dy = np.cos(np.deg2rad(angle)), -np.sin(np.deg2rad(angle))
    # bilinear splat of each sample point keeps the kernel's mass exact for any angle
    for ti, wi in zip(t, w):
        px, py = c + ti * dx, c + ti * dy
        x0, y0 = int(np.floor(px)), int(np.floor(py))
        fx, fy = px - x0, py - y0
        for yy, xx, ww in ((y0, x0, (1 - fx) * (1 - fy)), (y0, x0 + 1, fx * (1 - fy)),
                           (y0 + 1, x0, (1 - fx) * fy), (y0 + 1, x0 + 1, fx * fy)):
            if ww > 0 and 0 <= yy < size and 0 <= xx < size:
                k[yy, xx] += wi * ww
    return k / k.sum()


def _motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator, angle: float | None = None) -> np.ndarray:
    radius, sigma = MOTION_BLUR_224[severity - 1]
    s = min(x.shape[:2]) / 224.0
    theta = rng.uniform(-45.0, 45.0) if angle is None else float(angle)
    k = motion_kernel(radius * s, sigma * s, theta)
    return np.stack([ndimage.convolve(x[..., ch], k, mode="nearest") for ch in range(x.shape[-1])], axis=-1)


def spatter_mask(shape: tuple[int, int], severity: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean drop mask of :func:`spatter`: smoothed noise above its (1 − coverage) quantile."""
    coverage, sigma224, _, _ = SPATTER[_check_severity(severity) - 1]
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=max(0.7, sigma224 * min(shape) / 224.0))
    return field > np.quantile(field, 1.0 - coverage)


def _spatter(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    # drops of water (severity 1-3) or mud (4-5) blended over a bounded, blob-shaped region
    _, _, opacity, mud = SPATTER[severity - 1]
    mask = spatter_mask(x.shape[:2], severity, rng)
    color = (MUD if mud else WATER)[: x.shape[-1]] if x.shape[-1] == 3 else np.array([(MUD if mud else WATER).mean()])
    out = x.copy()
    out[mask] = (1 - opacity) * x[mask] + opacity * color
    return out


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """A uint8 image saved as JPEG at ``quality`` by PIL and decoded again."""
    a = np.asarray(img)
    gray = a.ndim == 3 and a.shape[-1] == 1
    pil = Image.fromarray(a[..., 0] if gray else a)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=int(quality))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(pil.mode))
    return out[..., None] if gray else out


def _jpeg(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    q = JPEG_QUALITY[_scale(min(x.shape[:2]))][severity - 1]
    u8 = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    return jpeg_roundtrip(u8, q).astype(np.float64) / 255.0


gaussian_noise = _per_image(_gaussian_noise, "gaussian_noise")
gaussian_noise.__doc__ = "Additive N(0, σ²) noise per value, σ growing with severity; clipped to the range."
impulse_noise = _per_image(_impulse_noise, "impulse_noise")
impulse_noise.__doc__ = "Salt-and-pepper noise: a severity-dependent fraction of values set to 0 or the maximum."
contrast = _per_image(_contrast, "contrast")
contrast.__doc__ = "Pull every value towards its channel's mean by a severity-dependent factor."
pixelate = _per_image(_pixelate, "pixelate")
pixelate.__doc__ = "Average over cells of a coarser grid and repeat each cell's mean over its pixels."
spatter = _per_image(_spatter, "spatter")
spatter.__doc__ = "Blend water (severity 1-3) or mud (4-5) drops over a seeded, bounded blob-shaped region."
jpeg = _per_image(_jpeg, "jpeg")
jpeg.__doc__ = "Save as JPEG at a severity-dependent quality with PIL and decode again."


def motion_blur(images: np.ndarray, severity: int = 3, seed: int = 0, angle: float | None = None,
                start: int = 0) -> np.ndarray:
    """Blur along a line at a seeded angle in [-45°, 45°] (or ``angle``), length growing with severity."""
    fn = _per_image(lambda x, s, rng: _motion_blur(x, s, rng, angle), "motion_blur")
    return fn(images, severity, seed, start)


FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "motion_blur": motion_blur, "impulse_noise": impulse_noise, "gaussian_noise": gaussian_noise,
    "pixelate": pixelate, "spatter": spatter, "contrast": contrast, "jpeg": jpeg,
}


def canonical(name: str) -> str:
    """The key in :data:`CORRUPTIONS` for ``name`` or its printed paper name (KeyError if unknown)."""
    key = {v.lower(): k for k, v in PAPER_NAMES.items()}.get(str(name).lower(), str(name))
    if key not in FUNCTIONS:
        raise KeyError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)} "
                       f"(or the paper's names: {', '.join(PAPER_NAMES.values())})")
    return key


def corrupt(images: np.ndarray, name: str, severity: int = 3, seed: int = 0, start: int = 0) -> np.ndarray:
    """Apply the corruption ``name`` (one of :data:`CORRUPTIONS` or its printed paper name); ``start``
    is the index of the first image in the whole set (the seeds follow it)."""
    return FUNCTIONS[canonical(name)](images, severity=severity, seed=seed, start=start)


__all__ = ["CORRUPTIONS", "FUNCTIONS", "PAPER_NAMES", "canonical", "contrast", "corrupt", "gaussian_noise",
           "impulse_noise", "jpeg", "jpeg_roundtrip", "motion_blur", "motion_kernel", "pixelate", "spatter", "spatter_mask"]
