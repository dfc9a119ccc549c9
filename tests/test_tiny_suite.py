"""The miniature's data generator: determinism, balance, split disjointness, bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mergebook.data import tiny_suite as T

# sha256 of the first 24 images+labels of every task's test split and of the pretraining mixture,
# seed 0. Recorded with numpy 2.4, scipy 1.17, matplotlib 3.11 (bundled FreeType), scikit-image 0.26;
# a change here means the benchmark itself changed and every cached/committed number is stale
# (last changed 2026-12-03: housenum drawn without neighbouring digits, benchmarks/miniature_design.py).
GOLDEN = "fa589e299ead78a3d049b32e050c1ee823b47bfc749103cca6f5654d1f960863"


def _digest() -> str:
    arrays = []
    for task in T.TASKS + ["pretrain"]:
        arrays += list(T.generate(task, "test", 24, seed=0))
    return T.array_digest(*arrays)


def test_generation_is_deterministic_and_matches_the_recorded_digest():
    d = _digest()
    assert d == _digest()
    assert d == GOLDEN, (
        "the miniature's images changed: if this is intended, update GOLDEN and re-run the book; if not, "
        "check the numpy/scipy/matplotlib/scikit-image versions against the ones recorded above"
    )


def test_generation_is_identical_in_a_fresh_process_with_another_hash_seed():
    code = "from tests.test_tiny_suite import _digest; print(_digest())"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    root = os.path.dirname(os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True)
    assert out.stdout.strip() == _digest()


def test_any_slice_regenerates_alone():
    x_all, y_all = T.generate("shapes", "train", 12)
    x_part, y_part = T.generate("shapes", "train", 4, start=8)
    np.testing.assert_array_equal(x_all[8:], x_part)
    np.testing.assert_array_equal(y_all[8:], y_part)


@pytest.mark.parametrize("task", T.TASKS)
def test_tasks_are_balanced_uint8_rgb(task):
    k = T.num_classes(task)
    x, y = T.generate(task, "train", 2 * k)
    assert x.dtype == np.uint8 and x.shape == (2 * k, 32, 32, 3)
    assert np.bincount(y, minlength=k).tolist() == [2] * k
    assert x.std() > 5  # not blank


def test_splits_differ():
    a, _ = T.generate("letters", "train", 26)
    b, _ = T.generate("letters", "test", 26)
    assert not np.array_equal(a, b)


def test_pretraining_classes_are_disjoint_from_task_classes():
    pre = {name for _, name in T.pretrain_classes()}
    for task in T.TASKS:
        clash = pre & set(T.class_names(task))
        assert not clash, f"{task} shares classes {clash} with the pretraining mixture"


def test_digit_writers_are_split_without_overlap():
    pools = [set(T._digit_pool(s).tolist()) for s in T.SPLITS]
    for i in range(len(pools)):
        for j in range(i + 1, len(pools)):
            assert not pools[i] & pools[j]


def test_unknown_task_or_split_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown miniature task 'mnist'.*digits"):
        T.generate("mnist", "train", 1)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        T.generate("digits", "dev", 1)
