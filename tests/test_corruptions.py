"""Each corruption's defining property, at the miniature's 32 px and at 224 px."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mergebook.data import corruptions as C


def photo(side: int, seed: int = 0) -> np.ndarray:
    """A smooth uint8 RGB test image (gradients plus a few blobs), not white noise."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    rng = np.random.default_rng(seed)
    chans = [0.5 + 0.3 * np.sin(2 * np.pi * (f * xx + g * yy)) for f, g in rng.uniform(0.5, 2.5, (3, 2))]
    return np.round(np.stack(chans, -1) * 255).astype(np.uint8)


SIDES = [32, 224]


@pytest.mark.parametrize("name", C.CORRUPTIONS)
@pytest.mark.parametrize("side", SIDES)
def test_shape_dtype_and_range_are_kept(name, side):
    img = photo(side)
    out = C.corrupt(img, name, severity=3, seed=0)
    assert out.shape == img.shape and out.dtype == np.uint8
    f = C.corrupt(img.astype(np.float32) / 255, name, severity=3, seed=0)
    assert f.dtype == np.float32 and f.min() >= 0 and f.max() <= 1
    # the float path is the uint8 path without the final rounding
    assert np.abs(f * 255 - out.astype(np.float64)).max() <= 0.5 + 1e-3
    assert not np.array_equal(out, img)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_seeded_per_image_and_independent_of_the_batch(name):
    batch = np.stack([photo(32, s) for s in range(3)])
    a, b = C.corrupt(batch, name, 4, seed=7), C.corrupt(batch, name, 4, seed=7)
    np.testing.assert_array_equal(a, b)
    # image 0 is corrupted alike alone or in a batch (its draws depend on seed and index only)
    np.testing.assert_array_equal(C.corrupt(batch[:1], name, 4, seed=7)[0], a[0])


@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "spatter", "motion_blur"])
def test_random_corruptions_change_with_the_seed(name):
    img = photo(64)
    assert not np.array_equal(C.corrupt(img, name, 3, seed=0), C.corrupt(img, name, 3, seed=1))


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_harsher_severity_moves_further_from_the_image(name):
    img = photo(224).astype(np.float64)
    d = [np.abs(C.corrupt(img / 255, name, s, seed=0) - img / 255).mean() for s in (1, 5)]
    assert d[1] > d[0]


# -------------------------------------------------------------------------------- defining properties
@pytest.mark.parametrize("side, severity", [(32, 1), (32, 5), (224, 1), (224, 2)])
def test_gaussian_noise_has_the_requested_std(side, severity):
    grey = np.full((side, side, 3), 0.5)  # far from 0 and 1, so clipping is rare
    std = C.GAUSSIAN_STD["small" if side < C.SMALL else "large"][severity - 1]
    batch = np.repeat(grey[None], 8, axis=0)
    noise = C.gaussian_noise(batch, severity, seed=0) - 0.5
    assert noise.mean() == pytest.approx(0.0, abs=0.01)
    assert noise.std() == pytest.approx(std, rel=0.03)


@pytest.mark.parametrize("side, severity", [(32, 5), (224, 3)])
def test_impulse_noise_sets_the_expected_fraction_to_black_or_white(side, severity):
    grey = np.full((4, side, side, 3), 128, np.uint8)
    out = C.impulse_noise(grey, severity, seed=0)
    amount = C.IMPULSE_AMOUNT["small" if side < C.SMALL else "large"][severity - 1]
    changed = out != 128
    n = changed.size
    tol = 4 * np.sqrt(amount * (1 - amount) / n)  # four binomial standard errors
    assert changed.mean() == pytest.approx(amount, abs=tol)
    assert set(np.unique(out[changed])) <= {0, 255}
    assert (out == 0).mean() == pytest.approx(amount / 2, abs=tol)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_contrast_scales_the_spread_around_each_channel_mean(side, severity):
    img = photo(side).astype(np.float64) / 255
    out = C.contrast(img, severity)
    c = C.CONTRAST_FACTOR["small" if side < C.SMALL else "large"][severity - 1]
    np.testing.assert_allclose(out.mean(axis=(0, 1)), img.mean(axis=(0, 1)), atol=1e-12)
    np.testing.assert_allclose(out.std(axis=(0, 1)), c * img.std(axis=(0, 1)), rtol=1e-9)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("severity", [1, 5])
def test_pixelate_is_constant_on_cells_holding_their_mean(side, severity):
    img = photo(side).astype(np.float64) / 255
    out = C.pixelate(img, severity)
    factor = C.PIXELATE_FACTOR["small" if side < C.SMALL else "large"][severity - 1]
    # an independent cell layout: output row i belongs to cell floor(i * k / side), k = round(side * factor)
    k = int(round(side * factor))
    cell = np.floor(np.arange(side) * k / side).astype(int)
    # (cell boundaries of the library are the first pixel of each cell: the same partition)
    for r in range(k):
        for q in range(k):
            block = out[cell == r][:, cell == q]
            src = img[cell == r][:, cell == q]
            assert np.ptp(block, axis=(0, 1)).max() < 1e-12
            np.testing.assert_allclose(block[0, 0], src.mean(axis=(0, 1)), atol=1e-12)
    assert len(np.unique(out[..., 0])) <= k * k


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("severity", [1, 5])
def test_jpeg_equals_a_pil_round_trip_at_the_severity_quality(side, severity):
    img = photo(side)
    q = C.JPEG_QUALITY["small" if side < C.SMALL else "large"][severity - 1]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=q)
    want = np.asarray(Image.open(buf).convert("RGB"))
    np.testing.assert_array_equal(C.jpeg(img, severity), want)


def test_jpeg_lower_quality_loses_more():
    img = photo(224)
    err = [np.abs(C.jpeg_roundtrip(img, q).astype(int) - img).mean() for q in (95, 50, 7)]
    assert err[0] < err[1] < err[2]


@pytest.mark.parametrize("side", SIDES)
def test_motion_blur_preserves_a_constant_image(side):
    flat = np.full((side, side, 3), 0.37)
    np.testing.assert_allclose(C.motion_blur(flat, 5, seed=3), flat, atol=1e-12)


def test_motion_kernel_sums_to_one_and_lies_along_its_angle():
    for angle in (-45, -10, 0, 30, 45):
        k = C.motion_kernel(6, 3, angle)
        assert k.sum() == pytest.approx(1.0) and (k >= 0).all()
    k0 = C.motion_kernel(6, 3, 0)
    c = k0.shape[0] // 2
    assert k0[c].sum() == pytest.approx(1.0)  # horizontal: all mass on the centre row
    assert k0[c, :c].sum() == 0  # one-sided, like ImageMagick's motion blur
    k90 = C.motion_kernel(6, 3, 90)
    assert k90[:, c].sum() == pytest.approx(1.0)


@pytest.mark.parametrize("side", SIDES)
def test_motion_blur_smooths_along_one_direction_only(side):
    yy, xx = np.mgrid[0:side, 0:side]
    stripes_x = np.repeat(((xx // 2) % 2).astype(float)[..., None], 3, -1)  # varies along x
    stripes_y = np.repeat(((yy // 2) % 2).astype(float)[..., None], 3, -1)  # varies along y
    # a horizontal blur flattens stripes that vary along x and leaves those along y untouched
    bx = C.motion_blur(stripes_x, 5, angle=0)
    by = C.motion_blur(stripes_y, 5, angle=0)
    assert bx.std() < 0.6 * stripes_x.std()
    np.testing.assert_allclose(by, stripes_y, atol=1e-12)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("severity", [1, 5])
def test_spatter_changes_only_its_bounded_drop_region(side, severity):
    img = photo(side).astype(np.float64) / 255
    out = C.spatter(img, severity, seed=2)
    coverage = C.SPATTER[severity - 1][0]
    mask = C.spatter_mask((side, side), severity, C._rng(2, 0, "spatter"))
    changed = np.any(np.abs(out - img) > 0, axis=-1)
    assert not changed[~mask].any()  # nothing outside the drops
    assert mask.mean() == pytest.approx(coverage, abs=1.5 / side)
    assert changed.mean() > 0.5 * coverage
    # drops are blobs, not single pixels: most drop pixels have a drop neighbour
    nb = np.zeros_like(mask)
    nb[1:] |= mask[:-1]
    nb[:-1] |= mask[1:]
    nb[:, 1:] |= mask[:, :-1]
    nb[:, :-1] |= mask[:, 1:]
    assert (nb & mask).sum() >= 0.6 * mask.sum()


# ------------------------------------------------------------------------------------------- input
def test_grayscale_and_paper_names_are_accepted():
    g = photo(32)[..., 0]
    out = C.corrupt(g, "Gaussian Noise", 2)
    assert out.shape == g.shape and out.dtype == np.uint8
    assert C.corrupt(g[..., None], "JPEG Compression", 2).shape == (32, 32, 1)
    assert set(C.PAPER_NAMES) == set(C.CORRUPTIONS)


@pytest.mark.parametrize("call, error, message", [
    (lambda: C.corrupt(photo(32), "fog"), KeyError, "unknown corruption 'fog'"),
    (lambda: C.contrast(photo(32), 0), ValueError, "severity must be an integer from 1"),
    (lambda: C.contrast(photo(32), 2.5), ValueError, "severity must be an integer from 1"),
    (lambda: C.contrast(photo(32).transpose(2, 0, 1), 2), ValueError, "channels-first"),
    (lambda: C.contrast(np.zeros((2, 3, 32, 32), np.float32), 2), ValueError, "channels-first"),
    (lambda: C.contrast(photo(32) - 128.0, 2), ValueError, "lie in \\[0, 1\\]"),
    (lambda: C.contrast(photo(32).astype(np.int32), 2), TypeError, "uint8"),
])
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
