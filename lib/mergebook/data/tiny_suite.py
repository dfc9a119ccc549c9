"""The offline miniature benchmark: eight 32-px image tasks and a disjoint pretraining mixture.

The eight tasks echo the eight of the papers (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST,
DTD) in spirit, not in content:

=============  ==========================================  =======
task           what it is                                   classes
=============  ==========================================  =======
digits         handwritten digits (scikit-learn's 8x8)      10
housenum       printed digits on photo/noise clutter       10
letters        Latin capitals in 15 fonts                   26
greek          Greek small letters (another script)         24
signs          traffic-sign-like symbols on photo clutter   12
textures       patches of scikit-image textures/photos      10
shapes         coloured geometric shapes                    8
patterns       periodic procedural patterns                 10
=============  ==========================================  =======

The pretraining mixture (``pretrain``) shares no class with them: Cyrillic and Latin small
letters, symbols, other shapes, noise bands and other patterns, crops of other photos, dominant
colours, and blob counts. Every image is a pure function of (task, split, seed), and images are
stored as uint8, so the arrays are identical across runs and machines.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
from scipy import ndimage

from . import render as R
from .render import SIZE

TASKS = ["digits", "housenum", "letters", "greek", "signs", "textures", "shapes", "patterns"]
# Which paper task each miniature task stands in for (for the side-by-side tables).
PAPER_ANALOGUE = {
    "digits": "MNIST", "housenum": "SVHN", "letters": "SUN397", "greek": "Cars",
    "signs": "GTSRB", "textures": "DTD", "shapes": "EuroSAT", "patterns": "RESISC45",
}
SPLITS = {"train": 0, "test": 1, "proto": 2, "val": 3}

LATIN_UPPER = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
GREEK_SMALL = list("αβγδεζηθικλμνξοπρστυφχψω")
# Cyrillic small letters, minus those that look like a Greek task class (к~κ, п~π, т~τ).
CYRILLIC_SMALL = list("бвгдежзийлмнфцчшщъыьэюя")
LATIN_SMALL = list("abdefghjkmnqrty")
SYMBOLS = list("&@#%$§?!+=*/<>{}()[]∑∫√∞≈≠÷±∂∇∈∩∪♠♣♥♦★♪¶€")


@functools.lru_cache(maxsize=None)
def _fonts_for(chars: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f for f in R.FONTS if all(R.has_glyph(f, c) for c in chars))


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    import skimage.data as skd

    img = getattr(skd, name)()
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    img = img.astype(np.float32) / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3]


TEXTURE_SOURCES = ["brick", "grass", "gravel", "coffee", "chelsea", "moon", "coins",
                   "hubble_deep_field", "immunohistochemistry", "page"]
CLUTTER_SOURCES = ["astronaut", "rocket", "camera"]  # backgrounds only, never a class
PRETRAIN_PHOTOS = ["astronaut", "camera", "rocket", "colorwheel", "retina", "cell", "clock", "logo", "text"]


def _photos(names: list[str]) -> list[np.ndarray]:
    return [_photo(n) for n in names]


@functools.lru_cache(maxsize=None)
def _sk_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = d.images.astype(np.float32) / 16.0
    up = np.stack([ndimage.zoom(im, 3, order=1) for im in imgs])  # 24 x 24
    up = np.stack([ndimage.gaussian_filter(u, 0.6) for u in up])
    return np.pad(up, ((0, 0), (2, 2), (2, 2))), d.target.astype(np.int64)


def _digit_pool(split: str) -> np.ndarray:
    """Indices of scikit-learn digits reserved for ``split`` (test writers never seen in training)."""
    n = len(_sk_digits()[1])
    perm = np.random.default_rng(1234).permutation(n)
    cut1, cut2 = int(0.55 * n), int(0.65 * n)
    cut3 = int(0.72 * n)
    return {"train": perm[:cut1], "proto": perm[cut1:cut2], "val": perm[cut2:cut3], "test": perm[cut3:]}[split]


def _glyph_image(rng, ch, fonts, *, ink_bg=True, height=(0.55, 0.85), rotate=15.0):
    font = fonts[int(rng.integers(len(fonts)))]
    m = R.place(R.glyph(font, ch), rng, height=height, rotate=rotate, shift=3.0)
    if ink_bg:
        paper = rng.uniform(0.6, 1.0) * np.ones(3, np.float32) * rng.uniform(0.85, 1.0, 3)
        bg = np.broadcast_to(paper, (SIZE, SIZE, 3)).copy()
        bg = bg * (1 - 0.25 * R.smooth_noise(rng, int(rng.integers(2, 6))))
        ink = rng.uniform(0.0, 0.35, 3).astype(np.float32)
        if rng.random() < 0.5:  # light ink on dark paper half the time
            bg, ink = 1 - bg, 1 - ink
        return R.composite(bg, m, ink)
    return m


# ----------------------------------------------------------------------------------- the 8 tasks
def _digits(rng, label, split):
    imgs, targets = _sk_digits()
    pool = _digit_pool(split)
    pool = pool[targets[pool] == label]
    src = imgs[pool[int(rng.integers(len(pool)))]]
    m = R.place(src, rng, height=(0.6, 0.95), rotate=12, shift=3, shear=0.2)
    img = np.repeat(m[..., None], 3, axis=2)
    return R.finish(rng, img, noise=0.05, jitter=0.15)


def _housenum(rng, label, split):
    bg = R.background(rng, ["noise", "photo", "gradient"][int(rng.integers(3))], _photos(CLUTTER_SOURCES))
    fonts = _fonts_for(tuple("0123456789"))
    col = R.contrasting_color(rng, bg.mean(axis=(0, 1)), 0.5)
    # No neighbouring digits, unlike SVHN. The first design drew them as tall as the centre digit,
    # 15 px away, and layer-wise AdaMerging then fell from Task Arithmetic's 52% to 32% on this task;
    # without them it holds (benchmarks/miniature_design.py measured both; chapter 02 reports it).
    m = R.place(R.glyph(fonts[int(rng.integers(len(fonts)))], str(label)), rng,
                height=(0.55, 0.75), rotate=8, shift=2)
    img = R.composite(bg, m, col)
    return R.finish(rng, img, noise=0.04, blur=rng.uniform(0, 0.8), jitter=0.2)


def _letters(rng, label, split):
    img = _glyph_image(rng, LATIN_UPPER[label], _fonts_for(tuple(LATIN_UPPER)))
    return R.finish(rng, img, noise=0.04, blur=rng.uniform(0, 0.5))


def _greek(rng, label, split):
    img = _glyph_image(rng, GREEK_SMALL[label], _fonts_for(tuple(GREEK_SMALL)))
    tint = rng.uniform(0.7, 1.0, 3).astype(np.float32)
    return R.finish(rng, img * tint, noise=0.04, blur=rng.uniform(0, 0.5))


RED, BLUE, YELLOW, WHITE, BLACK = (np.array(c, np.float32) for c in
                                   ([0.85, 0.1, 0.1], [0.1, 0.3, 0.8], [0.95, 0.8, 0.1], [0.95] * 3, [0.05] * 3))
# (outer shape, border colour, fill colour, inner symbol)
SIGN_CLASSES = [
    ("circle", RED, WHITE, "3"), ("circle", RED, WHITE, "5"), ("circle", RED, WHITE, "8"),
    ("circle", RED, RED, "bar"), ("triangle", RED, WHITE, "!"), ("triangle", RED, WHITE, "X"),
    ("circle", BLUE, BLUE, "→"), ("circle", BLUE, BLUE, "←"), ("circle", BLUE, BLUE, "↑"),
    ("octagon", RED, RED, "STOP"), ("diamond", YELLOW, YELLOW, "none"), ("yield", RED, WHITE, "none"),
]
SIGN_NAMES = ["limit-3", "limit-5", "limit-8", "no-entry", "warning", "crossing", "right",
              "left", "ahead", "stop", "priority", "yield"]


def _sign_outline(kind, center, r, angle):
    if kind == "circle":
        return R.disk_mask(center, r)
    verts = {
        "triangle": R.regular_polygon(3) * 1.15, "yield": -R.regular_polygon(3) * 1.15,
        "octagon": R.regular_polygon(8) @ np.array([[np.cos(np.pi / 8), np.sin(np.pi / 8)],
                                                     [-np.sin(np.pi / 8), np.cos(np.pi / 8)]]),
        "diamond": R.regular_polygon(4),
    }[kind]
    return R.polygon_mask(R.transform_unit(verts, center, r, angle))


def _signs(rng, label, split):
    kind, border, fill, sym = SIGN_CLASSES[label]
    bg = R.background(rng, ["photo", "noise"][int(rng.integers(2))], _photos(CLUTTER_SOURCES))
    r = rng.uniform(9, 14)
    c = SIZE / 2 - 0.5 + rng.uniform(-3, 3, 2)
    ang = np.deg2rad(rng.uniform(-8, 8))
    outer = _sign_outline(kind, c, r, ang)
    inner = _sign_outline(kind, c, r * (0.55 if kind in ("triangle", "yield") else 0.75), ang)
    img = R.composite(bg, outer, border)
    img = R.composite(img, inner, fill)
    if sym == "bar":
        bar = R.polygon_mask(R.transform_unit(np.array([[-1, -0.25], [1, -0.25], [1, 0.25], [-1, 0.25]]),
                                              c, r * 0.65, ang))
        img = R.composite(img, bar, WHITE)
    elif sym != "none":
        font = "DejaVuSans-Bold.ttf"
        if sym == "STOP":
            m = R.place(_word_mask(font, "STOP"), rng, height=(r * 1.3 / SIZE,) * 2, rotate=5, shift=0.5,
                        center=tuple(c), aspect=(1.0, 1.0), shear=0.0)
        else:
            h = r * (0.9 if kind == "circle" else 0.6) / SIZE
            cc = tuple(c + (np.array([r * 0.15, 0]) if kind == "triangle" else 0))
            m = R.place(R.glyph(font, sym), rng, height=(h, h * 1.15), rotate=5, shift=0.5, center=cc)
        img = R.composite(img, m, WHITE if fill is not WHITE else BLACK)
    light = rng.uniform(0.5, 1.2)
    return R.finish(rng, img * light, noise=0.04, blur=rng.uniform(0, 1.0), jitter=0.15)


@functools.lru_cache(maxsize=None)
def _word_mask(font: str, word: str) -> np.ndarray:
    parts = [R.glyph(font, ch) for ch in word]
    h = max(p.shape[0] for p in parts)
    return np.concatenate([np.pad(p, ((0, h - p.shape[0]), (0, 0))) for p in parts], axis=1)


def _textures(rng, label, split):
    src = _photo(TEXTURE_SOURCES[label])
    # disjoint image regions: train/proto on the left 60%, validation next, test on the right 25%
    cols = {"val": (0.6, 0.75), "test": (0.75, 1.0)}.get(split, (0.0, 0.6))
    img = R.crop(rng, src, (24, 64), cols)
    img = np.rot90(img, int(rng.integers(4)))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if rng.random() < 0.3:
        img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)
    return R.finish(rng, img, noise=0.03, jitter=0.25)


SHAPE_NAMES = ["circle", "square", "triangle", "star", "pentagon", "hexagon", "plus", "ring"]


def _shape_mask(name, center, r, angle):
    if name == "circle":
        return R.disk_mask(center, r)
    if name == "ring":
        return R.disk_mask(center, r, r * 0.55)
    verts = {
        "square": R.regular_polygon(4) @ np.array([[np.cos(np.pi / 4), np.sin(np.pi / 4)],
                                                   [-np.sin(np.pi / 4), np.cos(np.pi / 4)]]),
        "triangle": R.regular_polygon(3), "star": R.regular_polygon(5, 0.42),
        "pentagon": R.regular_polygon(5), "hexagon": R.regular_polygon(6),
        "plus": np.array([[-0.3, 1], [0.3, 1], [0.3, 0.3], [1, 0.3], [1, -0.3], [0.3, -0.3], [0.3, -1],
                          [-0.3, -1], [-0.3, -0.3], [-1, -0.3], [-1, 0.3], [-0.3, 0.3]]),
    }[name]
    return R.polygon_mask(R.transform_unit(verts, center, r, angle))


def _shapes(rng, label, split):
    bg = R.background(rng, ["plain", "gradient", "noise"][int(rng.integers(3))])
    for _ in range(int(rng.integers(0, 3))):  # small distractor blobs
        bg = R.composite(bg, R.disk_mask(rng.uniform(2, SIZE - 2, 2), rng.uniform(1, 2.5)), R.random_color(rng))
    r = rng.uniform(8, 14)  # below ~8 px a star, a pentagon and a hexagon are the same blob at 32 px
    c = rng.uniform(r * 0.8, SIZE - r * 0.8, 2)
    m = _shape_mask(SHAPE_NAMES[label], c, r, rng.uniform(0, 2 * np.pi))
    img = R.composite(bg, m, R.contrasting_color(rng, bg.mean(axis=(0, 1)), 0.45))
    return R.finish(rng, img, noise=0.04, jitter=0.15)


PATTERN_NAMES = ["h-stripes", "v-stripes", "diag-up", "diag-down", "checker", "dots", "rings",
                 "sunburst", "zigzag", "grid"]


def _pattern_field(name, rng):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    p = rng.uniform(4, 9)
    ph = rng.uniform(0, 2 * np.pi)
    j = np.deg2rad(rng.uniform(-10, 10))
    u = np.cos(j) * xx + np.sin(j) * yy
    v = -np.sin(j) * xx + np.cos(j) * yy
    k = 2 * np.pi / p
    cy, cx = SIZE / 2 + rng.uniform(-6, 6, 2)
    if name == "h-stripes":
        f = np.sin(k * v + ph)
    elif name == "v-stripes":
        f = np.sin(k * u + ph)
    elif name == "diag-up":
        f = np.sin(k * (u + v) / np.sqrt(2) + ph)
    elif name == "diag-down":
        f = np.sin(k * (u - v) / np.sqrt(2) + ph)
    elif name == "checker":
        f = np.sin(k * u + ph) * np.sin(k * v + ph)
    elif name == "dots":
        f = np.cos(k * u + ph) * np.cos(k * v + ph) - 0.5
    elif name == "rings":
        f = np.sin(k * np.hypot(yy - cy, xx - cx) + ph)
    elif name == "sunburst":
        f = np.sin(int(rng.integers(5, 10)) * np.arctan2(yy - cy, xx - cx) + ph)
    elif name == "zigzag":
        f = np.sin(k * (v + p / 2 * np.abs(((u / p) % 2) - 1)) + ph)
    elif name == "grid":
        f = np.maximum(np.cos(k * u + ph), np.cos(k * v + ph)) - 0.6
    else:
        raise ValueError(name)
    return f


def _patterns(rng, label, split):
    f = _pattern_field(PATTERN_NAMES[label], rng)
    m = np.clip(f * rng.uniform(1.5, 4) + 0.5, 0, 1)[..., None]
    a, b = R.random_color(rng), R.random_color(rng)
    while np.linalg.norm(a - b) < 0.4:
        b = R.random_color(rng)
    img = a * m + b * (1 - m)
    return R.finish(rng, img, noise=0.05, blur=rng.uniform(0, 0.6), jitter=0.15)


TASK_SPECS = {
    "digits": (_digits, [str(i) for i in range(10)]),
    "housenum": (_housenum, [str(i) for i in range(10)]),
    "letters": (_letters, LATIN_UPPER),
    "greek": (_greek, GREEK_SMALL),
    "signs": (_signs, SIGN_NAMES),
    "textures": (_textures, TEXTURE_SOURCES),
    "shapes": (_shapes, SHAPE_NAMES),
    "patterns": (_patterns, PATTERN_NAMES),
}


# ------------------------------------------------------------------------------- pretraining mix
PRE_SHAPES = ["ellipse", "semicircle", "crescent", "trapezoid", "parallelogram", "L-shape", "T-shape",
              "heptagon", "star4", "star7"]
PRE_PATTERNS = ["noise-fine", "noise-mid", "noise-coarse", "plaid", "wavy", "spiral", "lines", "bricks"]
PRE_COLORS = {"red": [0.85, 0.15, 0.1], "green": [0.15, 0.7, 0.2], "blue": [0.15, 0.25, 0.85],
              "yellow": [0.9, 0.85, 0.15], "purple": [0.55, 0.2, 0.7], "cyan": [0.15, 0.8, 0.85],
              "orange": [0.95, 0.55, 0.1], "gray": [0.5, 0.5, 0.5]}


def _pre_shape(rng, name):
    bg = R.background(rng, ["plain", "gradient", "noise", "photo"][int(rng.integers(4))],
                      _photos(PRETRAIN_PHOTOS))
    r = rng.uniform(6, 13)
    c = rng.uniform(r * 0.8, SIZE - r * 0.8, 2)
    a = rng.uniform(0, 2 * np.pi)
    if name == "ellipse":
        m = R.place(R.disk_mask(np.array([15.5, 15.5]), 12, aspect=0.45), rng, height=(r * 2 / SIZE,) * 2,
                    rotate=180, shift=4)
    elif name == "semicircle":
        t = np.linspace(0, np.pi, 24)
        m = R.polygon_mask(R.transform_unit(np.stack([np.cos(t), np.sin(t)], 1), c, r, a))
    elif name == "crescent":
        m = np.clip(R.disk_mask(c, r) - R.disk_mask(c + r * 0.5 * np.array([np.cos(a), np.sin(a)]), r * 0.85), 0, 1)
    else:
        verts = {
            "trapezoid": np.array([[-1, -0.6], [1, -0.6], [0.5, 0.6], [-0.5, 0.6]]),
            "parallelogram": np.array([[-1, -0.5], [0.4, -0.5], [1, 0.5], [-0.4, 0.5]]),
            "L-shape": np.array([[-0.7, 1], [-0.2, 1], [-0.2, -0.5], [0.7, -0.5], [0.7, -1], [-0.7, -1]]),
            "T-shape": np.array([[-1, 1], [1, 1], [1, 0.55], [0.25, 0.55], [0.25, -1], [-0.25, -1], [-0.25, 0.55],
                           [-1, 0.55]]),
            "heptagon": R.regular_polygon(7), "star4": R.regular_polygon(4, 0.35),
            "star7": R.regular_polygon(7, 0.55),
        }[name]
        m = R.polygon_mask(R.transform_unit(verts, c, r, a))
    img = R.composite(bg, m, R.contrasting_color(rng, bg.mean(axis=(0, 1)), 0.4))
    return img


def _pre_pattern(rng, name):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if name.startswith("noise"):
        cells = {"noise-fine": 16, "noise-mid": 8, "noise-coarse": 3}[name]
        f = R.smooth_noise(rng, cells, 1)[..., 0] * 2 - 1
    else:
        p = rng.uniform(4, 9)
        k, ph, a = 2 * np.pi / p, rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
        u = np.cos(a) * xx + np.sin(a) * yy
        v = -np.sin(a) * xx + np.cos(a) * yy
        if name == "plaid":
            f = np.sin(k * u + ph) + np.sin(k * 0.6 * v)
        elif name == "wavy":
            f = np.sin(k * v + 2.5 * np.sin(u * 0.4) + ph)
        elif name == "spiral":
            cy, cx = SIZE / 2 + rng.uniform(-5, 5, 2)
            f = np.sin(np.hypot(yy - cy, xx - cx) * k + 3 * np.arctan2(yy - cy, xx - cx) + ph)
        elif name == "lines":
            f = -np.ones_like(u)
            for _ in range(int(rng.integers(3, 7))):
                b = rng.uniform(0, np.pi)
                d = np.cos(b) * (xx - rng.uniform(0, SIZE)) + np.sin(b) * (yy - rng.uniform(0, SIZE))
                f = np.maximum(f, 1 - np.abs(d))
        elif name == "bricks":
            row = np.floor(v / p)
            f = np.minimum(np.abs(np.sin(np.pi * v / p)),
                           np.abs(np.sin(np.pi * (u / (2 * p) + 0.5 * row)))) * 2 - 0.6
        else:
            raise ValueError(name)
    m = np.clip(f * rng.uniform(1.5, 3) + 0.5, 0, 1)[..., None]
    a_, b_ = R.random_color(rng), R.random_color(rng)
    return a_ * m + b_ * (1 - m)


def _pre_color(rng, name):
    base = np.array(PRE_COLORS[name], np.float32)
    tex = R.smooth_noise(rng, int(rng.integers(2, 8)))
    img = base + (tex - 0.5) * rng.uniform(0.1, 0.35)
    if rng.random() < 0.5:  # a patch of the colour on a neutral background
        bg = np.full((SIZE, SIZE, 3), rng.uniform(0.1, 0.9), np.float32)
        m = R.disk_mask(rng.uniform(8, 24, 2), rng.uniform(7, 14))
        img = R.composite(bg, m, base)
    return img


def _pre_count(rng, n):
    bg = R.background(rng, ["plain", "gradient", "noise"][int(rng.integers(3))])
    col = R.contrasting_color(rng, bg.mean(axis=(0, 1)), 0.45)
    centers: list[np.ndarray] = []
    while len(centers) < n:
        c = rng.uniform(4, SIZE - 4, 2)
        if all(np.linalg.norm(c - o) > 7 for o in centers):
            centers.append(c)
    for c in centers:
        bg = R.composite(bg, R.disk_mask(c, rng.uniform(2, 3.5)), col)
    return bg


def _pre_glyph(rng, ch):
    img = _glyph_image(rng, ch, _fonts_for((ch,)), height=(0.45, 0.85), rotate=25)
    if rng.random() < 0.4:
        tint = rng.uniform(0.5, 1.0, 3).astype(np.float32)
        img = img * tint
    return img


def pretrain_classes() -> list[tuple[str, str]]:
    """The (family, name) of every pretraining class; none is a class of the eight tasks."""
    out = [("glyph", c) for c in CYRILLIC_SMALL + LATIN_SMALL + SYMBOLS]
    out += [("shape", s) for s in PRE_SHAPES] + [("pattern", p) for p in PRE_PATTERNS]
    out += [("photo", p) for p in PRETRAIN_PHOTOS] + [("color", c) for c in PRE_COLORS]
    out += [("count", f"{n} blobs") for n in range(1, 6)]
    return out


def _pretrain_sample(rng, label):
    family, name = pretrain_classes()[label]
    if family == "glyph":
        img = _pre_glyph(rng, name)
    elif family == "shape":
        img = _pre_shape(rng, name)
    elif family == "pattern":
        img = _pre_pattern(rng, name)
    elif family == "photo":
        img = R.crop(rng, _photo(name), (24, 96))
        img = np.rot90(img, int(rng.integers(4)))
    elif family == "color":
        img = _pre_color(rng, name)
    else:
        img = _pre_count(rng, int(name.split()[0]))
    return R.finish(rng, img, noise=rng.uniform(0.0, 0.06), blur=rng.uniform(0, 0.8), jitter=0.2)


# --------------------------------------------------------------------------------------- public
def num_classes(task: str) -> int:
    """Number of classes of a task (or of the pretraining mixture)."""
    return len(pretrain_classes()) if task == "pretrain" else len(class_names(task))


def class_names(task: str) -> list[str]:
    """Human-readable class names of a task."""
    if task == "pretrain":
        return [f"{f}:{n}" for f, n in pretrain_classes()]
    _check_task(task)
    return list(TASK_SPECS[task][1])


def _check_task(task: str) -> None:
    if task not in TASK_SPECS and task != "pretrain":
        raise ValueError(f"unknown miniature task {task!r}; known: {', '.join(TASKS + ['pretrain'])}")


def generate(task: str, split: str, n: int, seed: int = 0, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8, N x 32 x 32 x 3) and labels of ``task``/``split``, balanced over classes.

    Sample ``i`` depends only on (task, split, seed, i), so any slice can be regenerated alone
    (``start`` offsets the index) and the result is identical across runs and machines.
    """
    _check_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    fn = _pretrain_sample if task == "pretrain" else TASK_SPECS[task][0]
    k = num_classes(task)
    task_id = int.from_bytes(hashlib.sha256(task.encode()).digest()[:4], "little")
    imgs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    labels = np.empty(n, np.int64)
    for j in range(n):
        i = start + j
        rng = np.random.default_rng([seed, task_id, SPLITS[split], i])
        label = i % k
        imgs[j] = fn(rng, label) if task == "pretrain" else fn(rng, label, split)
        labels[j] = label
    return imgs, labels


def array_digest(*arrays: np.ndarray) -> str:
    """sha256 of arrays' bytes, shapes and dtypes (used to pin the suite's determinism)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()
