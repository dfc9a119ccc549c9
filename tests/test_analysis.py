"""Landscape plane, task-subset sampler, energy rank and task-vector spectra."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch

from mergebook.analysis import energy_rank, landscape_plane, subsets, subsets_by_size, task_vector_spectra


def models(k: int = 4, seed: int = 0):
    """A pretrained state dict (with an integer buffer) and k fine-tuned ones."""
    g = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(5, generator=g),
           "steps": torch.tensor([7], dtype=torch.int64)}
    fts = [{"w": pre["w"] + torch.randn(5, 3, generator=g), "b": pre["b"] + torch.randn(5, generator=g),
            "steps": pre["steps"].clone()} for _ in range(k)]
    return pre, fts


def flat(sd):
    return torch.cat([sd["w"].reshape(-1), sd["b"]]).double()


def average(fts):
    return {"w": torch.stack([f["w"] for f in fts]).mean(0), "b": torch.stack([f["b"] for f in fts]).mean(0),
            "steps": fts[0]["steps"]}


# ---------------------------------------------------------------------------------- landscape plane
def test_plane_basis_is_orthonormal_and_centered_at_the_average():
    pre, fts = models()
    avg = average(fts)
    plane = landscape_plane(avg, fts)
    np.testing.assert_allclose((plane.basis @ plane.basis.T).numpy(), np.eye(2), atol=1e-12)
    np.testing.assert_allclose(plane.coordinates(avg), [0.0, 0.0], atol=1e-6)
    torch.testing.assert_close(plane.state_dict(0, 0)["w"], avg["w"])
    assert plane.state_dict(0.3, -1)["steps"] is avg["steps"]  # integer tensors ride along


def test_plane_directions_are_the_top_principal_components():
    # an independent route: numpy's SVD of the centered fine-tuned weights
    pre, fts = models(k=5, seed=1)
    x = np.stack([flat(f).numpy() for f in fts])
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    plane = landscape_plane(average(fts), fts)
    for i in range(2):
        assert abs(float(plane.basis[i] @ torch.from_numpy(vt[i]))) == pytest.approx(1.0, abs=1e-9)
    assert plane.explained[0] == pytest.approx(s[0] ** 2 / (s ** 2).sum())
    # task vectors and fine-tuned weights differ by a shift, which centering removes (up to the
    # float32 rounding of the subtraction)
    tvs = [{k: f[k] - pre[k] for k in ("w", "b")} for f in fts]
    other = landscape_plane(average(fts), tvs)
    np.testing.assert_allclose(np.abs((other.basis @ plane.basis.T).numpy()), np.eye(2), atol=1e-6)


def test_point_coordinates_round_trip():
    pre, fts = models()
    plane = landscape_plane(average(fts), fts)
    for a, b in [(0.0, 0.0), (1.5, -2.0), (-0.25, 3.0)]:
        sd = plane.state_dict(a, b)
        np.testing.assert_allclose(plane.coordinates(sd), [a, b], atol=1e-5)
        assert plane.residual(sd) < 1e-5
    # a point off the plane projects to its orthogonal foot: coordinates = basis · (θ − θ_avg)
    off = fts[0]
    d = flat(off) - flat(average(fts))
    np.testing.assert_allclose(plane.coordinates(off), (plane.basis @ d).numpy(), atol=1e-10)
    foot = plane.flat(*plane.coordinates(off))
    assert plane.residual(off) == pytest.approx(float((flat(off) - foot).norm()), rel=1e-6)


def test_task_arithmetic_path_projects_to_a_line_through_the_origin_at_one_over_k():
    # TA's path θ_pre + λ Σ τ_k is a straight line, so its projection is one too; at λ = 1/K it is
    # θ_avg itself, the plane's origin. With K = 3 the plane is the fine-tuned models' affine hull.
    pre, fts = models(k=3, seed=2)
    plane = landscape_plane(average(fts), fts)
    path = [{k: pre[k] + lam * sum(f[k] - pre[k] for f in fts) for k in ("w", "b")} | {"steps": pre["steps"]}
            for lam in (0.0, 1 / 3, 0.6, 1.0)]
    xy = plane.project(path)
    assert xy.shape == (4, 2)
    np.testing.assert_allclose(xy[1], [0, 0], atol=1e-5)
    assert plane.residual(path[1]) < 1e-5 and plane.residual(path[0]) > 0.1
    for f in fts:  # every fine-tuned model lies on the plane
        assert plane.residual(f) < 1e-5
    v1, v2 = xy[1] - xy[0], xy[3] - xy[0]
    assert abs(v1[0] * v2[1] - v1[1] * v2[0]) < 1e-4 * (np.linalg.norm(v1) * np.linalg.norm(v2) + 1e-12)
    assert plane.project([]).shape == (0, 2)


def test_plane_signs_are_deterministic_and_grid_evaluates_fn():
    pre, fts = models()
    p1, p2 = landscape_plane(average(fts), fts), landscape_plane(average(fts), fts)
    torch.testing.assert_close(p1.basis, p2.basis)
    assert (p1.coordinates(fts[0]) >= 0).all()
    xs, ys = [-1.0, 0.0, 1.0], [0.0, 2.0]
    g = p1.grid(xs, ys, lambda sd: float(p1.coordinates(sd)[0]))
    np.testing.assert_allclose(g, [[-1, 0, 1], [-1, 0, 1]], atol=1e-5)
    d = p1.grid(xs, ys, lambda sd: {"a": float(p1.coordinates(sd)[0]), "b": float(p1.coordinates(sd)[1])})
    np.testing.assert_allclose(d["b"], [[0, 0, 0], [2, 2, 2]], atol=1e-5)


def test_plane_errors_say_what_is_wrong():
    pre, fts = models()
    with pytest.raises(ValueError, match="at least 2 vectors"):
        landscape_plane(average(fts), fts[:1])
    with pytest.raises(ValueError, match="fewer than 2 directions"):
        landscape_plane(average(fts), [fts[0], fts[0], fts[0]])
    with pytest.raises(ValueError, match="like="):
        landscape_plane(flat(pre), fts)
    plane = landscape_plane(average(fts), fts)
    with pytest.raises(KeyError, match="lacks"):
        plane.coordinates({"w": pre["w"]})


# ------------------------------------------------------------------------------------ task subsets
def test_all_subsets_when_few_in_lexicographic_order():
    assert subsets(4, 2) == list(combinations(range(4), 2))
    assert subsets(8, 7, max_per_size=10) == list(combinations(range(8), 7))  # 8 ≤ 10
    assert sum(len(v) for v in subsets_by_size(8, range(2, 9)).values()) == 247  # CART Fig. 6


def test_sampled_subsets_are_distinct_sized_deterministic_and_seeded():
    a = subsets(8, 4, max_per_size=12, seed=0)
    assert len(a) == 12 and len(set(a)) == 12
    assert all(len(s) == 4 and list(s) == sorted(s) and len(set(s)) == 4 and max(s) < 8 for s in a)
    assert a == sorted(a) and a == subsets(8, 4, max_per_size=12, seed=0)
    assert a != subsets(8, 4, max_per_size=12, seed=1)
    # a size's sample does not depend on which other sizes are requested
    assert subsets_by_size(8, [3, 4], 12, seed=0)[4] == a


def test_sampling_is_uniform_over_subsets():
    # draw 1 of C(6,3)=20 subsets under 4000 seeds: each should come up ≈ 200 times
    counts = {}
    for seed in range(4000):
        (s,) = subsets(6, 3, max_per_size=1, seed=seed)
        counts[s] = counts.get(s, 0) + 1
    assert set(counts) == set(combinations(range(6), 3))
    assert max(abs(c - 200) for c in counts.values()) < 5 * math.sqrt(200)


def test_subsets_of_names_and_bad_sizes():
    tasks = ["digits", "housenum", "letters"]
    assert subsets(tasks, 2) == [("digits", "housenum"), ("digits", "letters"), ("housenum", "letters")]
    with pytest.raises(ValueError, match="between 1 and the number of tasks"):
        subsets(3, 4)
    with pytest.raises(ValueError, match="max_per_size"):
        subsets(3, 2, max_per_size=0)


# ------------------------------------------------------------------------------- energy rank, spectra
def test_energy_rank_by_hand():
    s = [3.0, 2.0, 1.0, 1.0]  # energies 9, 4, 1, 1 of 15: cumulative 0.6, 0.867, 0.933, 1
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 0.6) == 1
    assert energy_rank(s, 0.9) == 3
    assert energy_rank(s, 1.0) == 4
    assert energy_rank(s[::-1], 0.9) == 3  # order of the input does not matter
    assert energy_rank(np.zeros(4)) == 0
    np.testing.assert_array_equal(energy_rank(np.array([s, [1.0, 0, 0, 0]]), 0.9), [3, 1])
    assert energy_rank(torch.tensor(s), 0.8) == 2


def test_energy_rank_rejects_bad_input():
    with pytest.raises(ValueError, match="fraction"):
        energy_rank([1.0], 90)
    with pytest.raises(ValueError, match="non-negative"):
        energy_rank([1.0, -1.0])


def test_centered_spectra_of_identical_task_vectors_vanish():
    pre, fts = models(k=3)
    same = [fts[0]] * 3
    sp = task_vector_spectra(pre, same, ["w"], centered=True)
    assert sp["w"].shape == (3, 3) and np.abs(sp["w"]).max() < 1e-12
    raw = task_vector_spectra(pre, fts, ["w"], centered=False)
    want = np.linalg.svd(fts[1]["w"].double().numpy() - pre["w"].double().numpy(), compute_uv=False)
    np.testing.assert_allclose(raw["w"][1], want, rtol=1e-10)
    with pytest.raises(ValueError, match="2-D"):
        task_vector_spectra(pre, fts, ["b"], centered=True)
