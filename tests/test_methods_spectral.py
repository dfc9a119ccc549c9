"""The spectral family (TSV-M, Iso-C, Iso-CTS) and DARE: exact properties, and agreement with NumPy
re-implementations written line by line from the authors' code (zero-padded blocks, one task at a time)."""

import math

import numpy as np
import pytest
import torch

from mergebook.methods import METHODS, MergeError, list_methods, merge
from mergebook.methods import spectral as S
from mergebook.methods.cart import CLIP_MATRIX_SUFFIXES
from mergebook.methods.task_arithmetic import dare_drop
from mergebook.models.vit import ViTConfig, VisionTransformer
from mergebook.statedict import float_keys

WIDTH = 16
T = 3


@pytest.fixture(scope="module")
def pico():
    """A pico ViT in open_clip's visual layout (float64) and T fine-tuned copies."""
    torch.manual_seed(0)
    m = VisionTransformer(ViTConfig(image_size=16, patch_size=8, width=WIDTH, layers=2, heads=2, output_dim=8))
    pre = {k: v.detach().clone().double() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in pre.items()}
           for _ in range(T)]
    return pre, fts


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# NumPy references, after TSVM_utils.compute_and_sum_svd_mem_reduction and iso.py


def np_polar(x):
    u, _, vh = np.linalg.svd(x, full_matrices=False)
    return u @ vh


def np_tsv(deltas):
    t = len(deltas)
    r = min(deltas[0].shape)
    k = int(r * (1 / t))
    sum_u = np.zeros((deltas[0].shape[0], r))
    sum_s = np.zeros(r)
    sum_v = np.zeros((r, deltas[0].shape[1]))
    for i, d in enumerate(deltas):
        u, s, v = np.linalg.svd(d, full_matrices=False)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = v[:k, :]
    # polar of the zero-padded blocks, as the original (u_u @ v_u @ diag @ u_v @ v_v)
    return np_polar(sum_u) @ np.diag(sum_s) @ np_polar(sum_v)


def np_iso_c(deltas):
    u, s, v = np.linalg.svd(sum(deltas), full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ v


def np_iso_cts(deltas, f=0.8):
    t = len(deltas)
    shape = deltas[0].shape
    kc = int(min(shape) * f)
    kc = min(shape) - round((min(shape) - kc) / t) * t
    u, s, v = np.linalg.svd(sum(deltas), full_matrices=False)
    cu, cs, cv = u[:, :kc], s[:kc], v[:kc, :]
    n = int((min(shape) - kc) / t)
    U = np.zeros((shape[0], min(shape)))
    Sg = np.zeros(min(shape))
    V = np.zeros((min(shape), shape[1]))
    for i, w in enumerate(deltas):
        uts, sts, vts = np.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        U[:, i * n:(i + 1) * n] = uts[:, :n]
        Sg[i * n:(i + 1) * n] = sts[:n]
        V[i * n:(i + 1) * n, :] = vts[:n, :]
    U[:, t * n:t * n + kc] = cu
    Sg[t * n:t * n + kc] = cs
    V[t * n:t * n + kc, :] = cv
    return np_polar(U) @ np.diag(np.full_like(Sg, Sg.mean())) @ np_polar(V)


def np_merge(pre, fts, per_matrix, alpha):
    """The authors' state-dict loop: per_matrix on 2-D tensors (not text_projection), mean elsewhere."""
    out = {}
    for k, p in pre.items():
        tvs = [(ft[k] - p).numpy() for ft in fts]
        if p.dim() == 2 and "text_projection" not in k:
            merged = per_matrix(tvs)
        else:
            merged = sum(tvs) / len(tvs)
        out[k] = p.numpy() + alpha * merged
    return out


# ----------------------------------------------------------------------------------------------
# Registration and matrix sets


def test_spectral_methods_and_dare_are_registered():
    for name in ("tsv_m", "iso_c", "iso_cts", "dare"):
        assert name in list_methods()
        assert METHODS[name].paper and METHODS[name].url


def test_all_2d_matrix_set_adds_positional_embedding_and_proj_to_cart_four(pico):
    pre, _ = pico
    all2d = {k for k in float_keys(pre) if S.spectral_matrix_rule("all_2d")(k, pre[k])}
    cart = {k for k in float_keys(pre) if S.spectral_matrix_rule("cart")(k, pre[k])}
    assert cart == {k for k in pre if k.endswith(CLIP_MATRIX_SUFFIXES)} and len(cart) == 2 * 4
    assert all2d - cart == {"positional_embedding", "proj"}
    assert not S.all_2d_rule("text_projection", torch.zeros(4, 4))
    assert not S.all_2d_rule("conv1.weight", pre["conv1.weight"])  # 4-D: averaged


# ----------------------------------------------------------------------------------------------
# Exact properties on small matrices


def test_iso_c_merged_spectrum_is_flat_at_the_mean_of_the_sums_spectrum():
    d = _rand(T, 12, 7)
    out = S.iso_c_matrix(d)
    s_out = torch.linalg.svdvals(out)
    s_sum = torch.linalg.svdvals(d.sum(0))
    torch.testing.assert_close(s_out, torch.full_like(s_out, s_sum.mean().item()), rtol=1e-10, atol=1e-10)
    # same singular subspaces as the sum: the sum's projection onto out's column space is the sum
    q, _ = torch.linalg.qr(out)
    torch.testing.assert_close(q @ (q.T @ d.sum(0)), d.sum(0), rtol=1e-10, atol=1e-10)


def test_iso_cts_spectrum_is_flat_and_spans_the_common_subspace():
    d = _rand(T, 20, 15, seed=3)
    out = S.iso_cts_matrix(d, 0.6)
    s_out = torch.linalg.svdvals(out)
    assert (s_out.max() - s_out.min()) / s_out.max() < 1e-10
    kc, s = S.iso_cts_sizes(d.shape, T, 0.6)
    assert (kc, s) == (15 - round((15 - 9) / 3) * 3, 2) == (9, 2)
    u_c = torch.linalg.svd(d.sum(0))[0][:, :kc]
    u_out = torch.linalg.svd(out)[0][:, :15]
    # the common directions are inside out's column space
    torch.testing.assert_close(u_out @ (u_out.T @ u_c), u_c, rtol=1e-9, atol=1e-9)


def test_iso_cts_sizes_follow_the_authors_rounding():
    assert S.iso_cts_sizes((768, 768), 8, 0.8) == (616, 19)
    assert S.iso_cts_sizes((3072, 768), 8, 0.8) == (616, 19)
    assert S.iso_cts_sizes((16, 16), 8, 0.8) == (16, 0)  # round(0.5) == 0: Python's half-to-even
    assert S.iso_cts_sizes((10, 10), 4, 0.0) == (2, 2)  # round(2.5) == 2
    with pytest.raises(MergeError, match="common_fraction"):
        S.iso_cts_sizes((6, 6), 4, 0.0)  # round(1.5)·4 = 8 > 6 directions


def test_tsv_m_one_task_full_rank_returns_the_task_vector(pico):
    pre, fts = pico
    d = _rand(1, 9, 6)
    torch.testing.assert_close(S.tsv_matrix(d), d[0], rtol=1e-10, atol=1e-10)
    out = merge("tsv_m", pre, fts[:1])  # one task: share 1/T = 1 is full rank; α = 1
    for k in pre:
        torch.testing.assert_close(out[k], fts[0][k], rtol=1e-10, atol=1e-10)


def test_tsv_m_factors_are_orthonormal_and_keep_the_task_singular_values():
    d = _rand(T, 15, 12, seed=5)
    k = S.tsv_rank(d.shape, T)
    assert k == 4
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    u_cat = u[..., :k].movedim(0, 1).reshape(15, T * k)
    vh_cat = vh[:, :k, :].reshape(T * k, 12)
    pu, pv = S.polar(u_cat), S.polar(vh_cat)
    eye = torch.eye(T * k, dtype=torch.float64)
    torch.testing.assert_close(pu.T @ pu, eye, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pv @ pv.T, eye, rtol=1e-10, atol=1e-10)
    # the raw concatenations are not orthonormal: the tasks' singular vectors interfere
    assert (u_cat.T @ u_cat - eye).abs().max() > 0.05
    # hence ΔW has exactly the concatenated singular values as its spectrum
    out = S.tsv_matrix(d)
    sv = torch.linalg.svdvals(out)[:T * k]
    torch.testing.assert_close(sv, s[:, :k].reshape(-1).sort(descending=True).values, rtol=1e-9, atol=1e-9)


def test_tsv_m_of_tasks_with_orthogonal_supports_is_the_sum_of_their_truncations():
    # tasks living on disjoint row and column blocks do not interfere: TSV-M = Σ_t SVD_k(Δ_t)
    d = torch.zeros(2, 8, 8, dtype=torch.float64)
    d[0, :4, :4] = _rand(4, 4, seed=1)
    d[1, 4:, 4:] = _rand(4, 4, seed=2)
    k = S.tsv_rank(d.shape, 2)
    u, s, vh = torch.linalg.svd(d)
    expect = sum((u[t, :, :k] * s[t, :k]) @ vh[t, :k] for t in range(2))
    torch.testing.assert_close(S.tsv_matrix(d), expect, rtol=1e-10, atol=1e-10)


def test_batched_matrices_equal_one_at_a_time():
    d = _rand(4, T, 10, 6, seed=7)
    for fn in (S.tsv_matrix, S.iso_c_matrix, lambda x: S.iso_cts_matrix(x, 0.5)):
        batched = fn(d)
        for g in range(4):
            torch.testing.assert_close(batched[g], fn(d[g]), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Agreement with the NumPy re-implementations on pico weights


@pytest.mark.parametrize("name,ref,kw", [
    ("tsv_m", np_tsv, {}),
    ("iso_c", np_iso_c, {}),
    ("iso_cts", np_iso_cts, {}),
    ("iso_cts", lambda d: np_iso_cts(d, 0.5), {"common_fraction": 0.5}),
])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_agrees_with_numpy_reimplementation_of_the_authors_code(pico, name, ref, kw, alpha):
    pre, fts = pico
    ours = merge(name, pre, fts, scaling_coef=alpha, **kw)
    theirs = np_merge(pre, fts, ref, alpha)
    assert list(ours) == list(pre)
    for k in pre:
        np.testing.assert_allclose(ours[k].numpy(), theirs[k], rtol=1e-9, atol=1e-10, err_msg=k)


def test_tsv_m_agrees_with_numpy_when_rank_is_not_divisible_by_tasks():
    # r = 7, T = 3: k = 2, one zero-padded column in the original; the compact polar gives the same ΔW
    d = [_rand(9, 7, seed=s).numpy() for s in range(3)]
    np.testing.assert_allclose(S.tsv_matrix(torch.tensor(np.stack(d))).numpy(), np_tsv(d), rtol=1e-9, atol=1e-10)


def test_cart_matrix_set_averages_positional_embedding_and_proj(pico):
    pre, fts = pico
    out = merge("iso_c", pre, fts, matrix_set="cart", scaling_coef=2.0)
    for k in ("positional_embedding", "proj", "ln_post.weight", "transformer.resblocks.0.attn.in_proj_bias"):
        mean = sum(ft[k] - pre[k] for ft in fts) / T
        torch.testing.assert_close(out[k], pre[k] + 2.0 * mean, rtol=1e-12, atol=1e-12)
    k = "transformer.resblocks.1.mlp.c_fc.weight"
    torch.testing.assert_close(out[k], pre[k] + 2.0 * S.iso_c_matrix(torch.stack([ft[k] - pre[k] for ft in fts])))


def test_float32_weights_stay_float32_and_match_float64_closely(pico):
    pre, fts = pico
    pre32 = {k: v.float() for k, v in pre.items()}
    fts32 = [{k: v.float() for k, v in ft.items()} for ft in fts]
    for name in ("tsv_m", "iso_c", "iso_cts"):
        a, b = merge(name, pre32, fts32), merge(name, pre, fts)
        for k in pre:
            assert a[k].dtype == torch.float32
            torch.testing.assert_close(a[k].double(), b[k], rtol=1e-4, atol=1e-5)


def test_stack_qkv_on_split_q_k_v_equals_the_fused_in_proj(pico):
    pre, fts = pico

    def split(sd):
        out = {}
        for k, v in sd.items():
            if k.endswith("attn.in_proj_weight"):
                for part, name in zip(v.chunk(3, 0), ("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                    out[k.replace("in_proj_weight", name)] = part.clone()
            else:
                out[k] = v
        return out

    fused = merge("tsv_m", pre, fts)
    split_out = merge("tsv_m", split(pre), [split(f) for f in fts], stack_qkv=True)
    for k, v in split(fused).items():
        torch.testing.assert_close(split_out[k], v, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# DARE


def test_dare_expectation_equals_the_input():
    x = _rand(40, 25, seed=11)
    p, n = 0.6, 400
    mean = torch.stack([dare_drop(x, p, seed=s) for s in range(n)]).mean(0)
    # each draw has variance x²·p/(1−p) per entry; the mean of n draws has std |x|·sqrt(p/((1−p)n))
    z = (mean - x) / (x.abs() * math.sqrt(p / ((1 - p) * n)))
    assert z.abs().max() < 5.0  # 1000 entries: P(max |z| > 5) ≈ 6e-4 under a correct implementation
    assert abs(z.mean().item()) < 5.0 / math.sqrt(z.numel())  # no bias on aggregate either


def test_dare_drops_a_p_share_rescales_the_rest_and_is_seeded():
    x = _rand(200, 50, seed=12)
    p = 0.3
    y = dare_drop(x, p, seed=4, index=1, key="w")
    kept = y != 0
    # Binomial(10000, 0.7): std 46 entries
    assert abs(kept.sum().item() - (1 - p) * x.numel()) < 5 * math.sqrt(x.numel() * p * (1 - p))
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    assert torch.equal(y, dare_drop(x, p, seed=4, index=1, key="w"))
    assert not torch.equal(y, dare_drop(x, p, seed=5, index=1, key="w"))
    assert not torch.equal(y, dare_drop(x, p, seed=4, index=2, key="w"))
    assert torch.equal(dare_drop(x, 0.0), x)
    assert torch.equal(dare_drop(x, p, seed=4, rescale=False) != 0, dare_drop(x, p, seed=4) != 0)


def test_dare_task_arithmetic_is_ta_on_the_dropped_vectors(pico):
    pre, fts = pico
    out = merge("dare", pre, fts, p=0.5, seed=3, scaling_coef=0.4)
    for k in float_keys(pre):
        tv = sum(dare_drop(ft[k] - pre[k], 0.5, seed=3, index=i, key=k) for i, ft in enumerate(fts))
        torch.testing.assert_close(out[k], pre[k] + 0.4 * tv, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(out.values(), merge("dare", pre, fts, p=0.5, seed=3,
                                                                    scaling_coef=0.4).values()))


def test_dare_ties_is_ties_on_the_dropped_models(pico):
    pre, fts = pico
    dropped = [{k: (pre[k] + dare_drop(ft[k] - pre[k], 0.5, seed=0, index=i, key=k)) if k in float_keys(pre)
                else ft[k] for k in pre} for i, ft in enumerate(fts)]
    ours = merge("dare", pre, fts, merger="ties", p=0.5)  # λ defaults to 0.5 with ties (FusionBench)
    ties = merge("ties", pre, dropped, k=0.2, scaling_coef=0.5, disjoint="sum")
    for k in pre:
        torch.testing.assert_close(ours[k], ties[k], rtol=1e-12, atol=1e-12)


def test_dare_at_p_zero_is_task_arithmetic(pico):
    pre, fts = pico
    a, b = merge("dare", pre, fts, p=0.0), merge("task_arithmetic", pre, fts, scaling_coef=0.3)
    for k in pre:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("name,kw,match", [
    ("dare", {"p": 1.0}, "out of range"),
    ("dare", {"p": -0.1}, "out of range"),
    ("dare", {"merger": "mean"}, "not valid"),
    ("dare", {"seed": 1.5}, "integer"),
    ("tsv_m", {"scaling_coef": 30.0}, "out of range"),
    ("tsv_m", {"share": 0.0}, "out of range"),
    ("tsv_m", {"share": 1.5}, "out of range"),
    ("tsv_m", {"matrix_set": "linear"}, "not valid"),
    ("iso_c", {"scaling_coef": float("nan")}, "finite"),
    ("iso_cts", {"common_fraction": 1.2}, "out of range"),
    ("iso_cts", {"common_fraction": 0.0}, "common_fraction"),  # rounding overshoots on 16-wide matrices
    ("iso_c", {"alpha": 1.0}, "unknown parameter"),
])
def test_bad_inputs_raise_merge_error_naming_the_fix(pico, name, kw, match):
    pre, fts = pico
    with pytest.raises(MergeError, match=match):
        merge(name, pre, fts, **kw)


def test_iso_needs_two_models_but_tsv_m_takes_one(pico):
    pre, fts = pico
    with pytest.raises(MergeError, match="at least 2"):
        merge("iso_c", pre, fts[:1])
    merge("tsv_m", pre, fts[:1])


def test_combine_rejects_a_drop_rate_of_one(pico):
    from mergebook.methods import combine
    from mergebook.statedict import task_vectors

    pre, fts = pico
    with pytest.raises(MergeError, match="drop"):
        combine(pre, task_vectors(pre, fts), 0.3, drop=1.0)


# ----------------------------------------------------------------------------------------------
# The chapter's measures (mergebook.spectral_analysis)


def test_effective_rank_is_full_for_a_flat_spectrum_and_one_for_rank_one():
    from mergebook.spectral_analysis import effective_rank

    assert effective_rank(torch.ones(10)) == pytest.approx(10.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    # exp(entropy) of p = (0.5, 0.25, 0.25) is 2^1.5
    assert effective_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(2 ** 1.5)


def test_energy_rank_follows_the_iso_code_index():
    from mergebook.spectral_analysis import energy_rank

    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    e = np.sqrt(np.cumsum(s.numpy() ** 2) / (s.numpy() ** 2).sum())
    assert energy_rank(s, 0.95) == int(np.argmax(e > 0.95)) == 1  # 0-based: one fewer than the count


def test_sar_is_one_inside_the_merged_subspace_and_zero_outside():
    from mergebook.spectral_analysis import subspace_alignment_ratio

    m = torch.zeros(6, 6, dtype=torch.float64)
    m[0, 0], m[1, 1] = 2.0, 1.9  # sqrt energy (0.72, 1): first index above 0.9 is 1, so k = 1 keeps e1
    inside = torch.zeros(6, 6, dtype=torch.float64)
    inside[0, 3] = 1.0
    outside = torch.zeros(6, 6, dtype=torch.float64)
    outside[5, 2] = 1.0
    assert subspace_alignment_ratio(inside, m, 0.9) == pytest.approx(1.0)
    assert subspace_alignment_ratio(outside, m, 0.9) == pytest.approx(0.0)


def test_sti_is_zero_for_orthogonal_tasks_and_matches_its_definition():
    from mergebook.spectral_analysis import singular_task_interference

    d = torch.zeros(2, 8, 8, dtype=torch.float64)
    d[0, :4, :4] = _rand(4, 4, seed=1)
    d[1, 4:, 4:] = _rand(4, 4, seed=2)
    assert singular_task_interference(d) == pytest.approx(0.0, abs=1e-12)
    x = _rand(T, 9, 6, seed=4)
    k = 2
    us, ss, vs = [], [], []
    for t in range(T):
        u, s, vh = np.linalg.svd(x[t].numpy(), full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)
    U, V, Sg = np.hstack(us), np.hstack(vs), np.diag(np.concatenate(ss))
    ref = np.abs((U.T @ U - np.eye(T * k)) @ Sg @ (V.T @ V - np.eye(T * k))).sum()
    assert singular_task_interference(x, k=k, normalise=False) == pytest.approx(ref, rel=1e-10)
    assert singular_task_interference(x, k=k) == pytest.approx(ref / Sg.sum(), rel=1e-10)


def test_spectral_report_sees_iso_c_flat_and_task_arithmetic_not(pico):
    from mergebook.spectral_analysis import spectral_report

    pre, fts = pico
    merged = {"Iso-C": merge("iso_c", pre, fts), "TA": merge("task_arithmetic", pre, fts)}
    rep = spectral_report(pre, fts, merged)
    share = rep["matrices"].groupby("method")["eff_rank_share"].min()
    assert share["Iso-C"] == pytest.approx(1.0, abs=1e-9) and share["TA"] < 0.999
    assert set(rep["sar"]["task"]) == set(range(T)) and rep["sar"]["sar"].between(0, 1 + 1e-12).all()
