"""Deterministic raster primitives for the offline miniature: glyphs, polygons, backgrounds.

Everything here is NumPy/SciPy on float32 images in [0, 1], drawn from a caller's
``numpy.random.Generator`` so that a seed fixes every pixel. Glyphs are rasterised with the
FreeType build that matplotlib ships, from matplotlib's bundled fonts, so no system fonts and no
network are involved.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from scipy import ndimage

SIZE = 32  # every miniature image is SIZE x SIZE x 3

_FONT_DIR = Path(__import__("matplotlib").get_data_path()) / "fonts" / "ttf"
# Fonts with broad Latin/Greek/Cyrillic coverage, in a fixed order (the order is part of the seed).
FONTS = [
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
]


@functools.lru_cache(maxsize=None)
def _font(name: str):
    from matplotlib.ft2font import FT2Font

    return FT2Font(str(_FONT_DIR / name))


def has_glyph(font: str, ch: str) -> bool:
    """Whether ``font`` has a real glyph for ``ch`` (not the missing-glyph box)."""
    return _font(font).get_char_index(ord(ch)) != 0


@functools.lru_cache(maxsize=None)
def glyph(font: str, ch: str, px: int = 40) -> np.ndarray:
    """Coverage mask of one character, tightly cropped, lightly blurred for clean downscaling."""
    f = _font(font)
    f.clear()
    f.set_size(px, 72)
    f.set_text(ch, 0.0)
    f.draw_glyphs_to_bitmap(antialiased=True)
    img = np.asarray(f.get_image(), dtype=np.float32) / 255.0
    ys, xs = np.nonzero(img > 0.05)
    if len(ys) == 0:
        raise ValueError(f"font {font} renders {ch!r} as blank")
    img = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    img = np.pad(img, 4)
    return ndimage.gaussian_filter(img, 0.7).astype(np.float32)


def place(
    src: np.ndarray, rng: np.random.Generator, *, height: tuple[float, float] = (0.5, 0.8),
    rotate: float = 15.0, shift: float = 3.0, shear: float = 0.15, center: tuple[float, float] | None = None,
    aspect: tuple[float, float] = (0.9, 1.1),
) -> np.ndarray:
    """Warp a 2-D mask into a SIZE x SIZE canvas with a random similarity-plus-shear transform."""
    h, w = src.shape
    target = rng.uniform(*height) * SIZE
    s = target / max(h, w)
    a = np.deg2rad(rng.uniform(-rotate, rotate))
    sh = rng.uniform(-shear, shear)
    asp = rng.uniform(*aspect)
    # forward map (input -> output) = R @ Shear @ Scale; affine_transform wants output -> input
    fwd = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1, sh], [0, 1]])
    fwd = fwd @ np.diag([s * asp, s / asp])
    inv = np.linalg.inv(fwd)
    c_out = np.array(center if center is not None else (SIZE / 2 - 0.5, SIZE / 2 - 0.5))
    c_out = c_out + rng.uniform(-shift, shift, 2)
    c_in = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = c_in - inv @ c_out
    return ndimage.affine_transform(src, inv, offset, output_shape=(SIZE, SIZE), order=1).astype(np.float32)


def polygon_mask(vertices: np.ndarray, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage of a polygon given in pixel coordinates (row, col) of the canvas."""
    from skimage.draw import polygon

    n = SIZE * supersample
    m = np.zeros((n, n), np.float32)
    v = (np.asarray(vertices) + 0.5) * supersample - 0.5
    rr, cc = polygon(v[:, 0], v[:, 1], (n, n))
    m[rr, cc] = 1.0
    return m.reshape(SIZE, supersample, SIZE, supersample).mean(axis=(1, 3))


def transform_unit(vertices: np.ndarray, center: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Map unit-circle vertices (x, y) to canvas (row, col) with rotation, scale and translation."""
    c, s = np.cos(angle), np.sin(angle)
    rot = vertices @ np.array([[c, s], [-s, c]])
    return np.stack([center[0] - rot[:, 1] * radius, center[1] + rot[:, 0] * radius], axis=1)


def regular_polygon(n: int, star_inner: float | None = None) -> np.ndarray:
    """Vertices of a regular n-gon (or an n-pointed star) on the unit circle, pointing up."""
    t = np.pi / 2 + 2 * np.pi * np.arange(n) / n
    pts = np.stack([np.cos(t), np.sin(t)], 1)
    if star_inner is None:
        return pts
    ti = t + np.pi / n
    inner = star_inner * np.stack([np.cos(ti), np.sin(ti)], 1)
    return np.stack([pts, inner], 1).reshape(-1, 2)


def disk_mask(center: np.ndarray, r_out: float, r_in: float = 0.0, aspect: float = 1.0) -> np.ndarray:
    """Anti-aliased filled disk (or ring when r_in > 0, or ellipse with aspect != 1)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    d = np.sqrt((yy - center[0]) ** 2 + ((xx - center[1]) / aspect) ** 2)
    m = np.clip(r_out + 0.5 - d, 0, 1)
    if r_in > 0:
        m = m * np.clip(d - r_in + 0.5, 0, 1)
    return m.astype(np.float32)


def smooth_noise(rng: np.random.Generator, cells: int, channels: int = 3) -> np.ndarray:
    """Value noise: a random cells x cells grid upsampled smoothly to the canvas, in [0, 1]."""
    g = rng.random((cells + 3, cells + 3, channels)).astype(np.float32)
    z = ndimage.zoom(g, (SIZE / cells, SIZE / cells, 1), order=3, mode="nearest", grid_mode=True)
    off = int(SIZE / cells)
    z = z[off : off + SIZE, off : off + SIZE]
    z = z - z.min()
    return (z / max(float(z.max()), 1e-6)).astype(np.float32)


def random_color(rng: np.random.Generator, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """A uniform random RGB colour."""
    return rng.uniform(lo, hi, 3).astype(np.float32)


def contrasting_color(rng: np.random.Generator, bg_mean: np.ndarray, min_dist: float = 0.45) -> np.ndarray:
    """A random colour at least ``min_dist`` (Euclidean, RGB) from ``bg_mean``."""
    for _ in range(100):
        c = random_color(rng)
        if np.linalg.norm(c - bg_mean) >= min_dist:
            return c
    return (1.0 - bg_mean).astype(np.float32)


def background(rng: np.random.Generator, kind: str, photos: list[np.ndarray] | None = None) -> np.ndarray:
    """A SIZE x SIZE x 3 background: ``plain``, ``gradient``, ``noise`` or ``photo`` (crop of a pool)."""
    if kind == "plain":
        img = np.broadcast_to(random_color(rng), (SIZE, SIZE, 3)).copy()
    elif kind == "gradient":
        a, b = random_color(rng), random_color(rng)
        t = np.linspace(0, 1, SIZE, dtype=np.float32)
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.meshgrid(t, t, indexing="ij")
        w = np.clip((np.cos(ang) * xx + np.sin(ang) * yy + 1) / 2, 0, 1)[..., None]
        img = a * (1 - w) + b * w
    elif kind == "noise":
        img = smooth_noise(rng, int(rng.integers(2, 8)))
        img = img * rng.uniform(0.3, 1.0) + rng.uniform(0, 0.5)
    elif kind == "photo":
        if not photos:
            raise ValueError("background kind 'photo' needs a photo pool")
        img = crop(rng, photos[int(rng.integers(len(photos)))], (32, 96))
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    return np.clip(img, 0, 1).astype(np.float32)


def crop(rng: np.random.Generator, image: np.ndarray, side: tuple[int, int], cols: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """A random square crop (side in pixels) resized to the canvas; ``cols`` limits where it may start."""
    h, w = image.shape[:2]
    s = int(rng.integers(side[0], min(side[1], h, w) + 1))
    c0 = int(cols[0] * w)
    c1 = max(c0 + 1, int(cols[1] * w) - s + 1)
    y = int(rng.integers(0, h - s + 1))
    x = int(rng.integers(c0, min(c1, w - s + 1)))
    patch = image[y : y + s, x : x + s]
    z = SIZE / s
    out = ndimage.zoom(patch, (z, z, 1), order=1, grid_mode=True, mode="nearest")
    return out[:SIZE, :SIZE].astype(np.float32)


def composite(bg: np.ndarray, mask: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Paint ``color`` over ``bg`` with coverage ``mask``."""
    m = mask[..., None]
    return bg * (1 - m) + color * m


def finish(rng: np.random.Generator, img: np.ndarray, noise: float = 0.03, blur: float = 0.0,
           jitter: float = 0.1) -> np.ndarray:
    """Photometric nuisance: brightness/contrast jitter, optional blur, pixel noise; returns uint8."""
    img = img * rng.uniform(1 - jitter, 1 + jitter) + rng.uniform(-jitter, jitter) / 2
    if blur > 0:
        img = ndimage.gaussian_filter(img, (blur, blur, 0))
    img = img + rng.normal(0, noise, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
