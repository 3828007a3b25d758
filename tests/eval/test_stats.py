"""eval/stats.py against scipy's and statsmodels-free reference formulas (issue 28: every accuracy gets a 95% CI)."""

import math
import random

import pytest
from scipy import stats as sps

from eval import stats
from eval.report import task_metrics
from eval.tasks import TASKS_BY_KEY


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (7, 20), (183, 272), (1, 1)])
def test_wilson_matches_scipy_binomtest(k, n):
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = stats.wilson(k, n)
    assert low == pytest.approx(ref.low, abs=1e-9) and high == pytest.approx(ref.high, abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0
    assert stats.wilson(0, 0) is None


@pytest.mark.parametrize("b,c", [(93, 32), (3, 0), (0, 0), (5, 5), (1, 12)])
def test_exact_mcnemar_matches_scipy_binomial_on_discordant_pairs(b, c):
    first = [True] * b + [False] * c + [True] * 4 + [False] * 3
    second = [False] * b + [True] * c + [True] * 4 + [False] * 3
    out = stats.mcnemar_exact(first, second)
    assert (out["b"], out["c"]) == (b, c)
    ref = 1.0 if b + c == 0 else sps.binomtest(b, b + c, 0.5).pvalue
    assert out["p_value"] == pytest.approx(ref, rel=1e-9)


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    rng = random.Random(1)
    values = [rng.random() for _ in range(200)]
    a, b = stats.bootstrap_mean(values, seed="x"), stats.bootstrap_mean(values, seed="x")
    assert a == b
    mean = sum(values) / len(values)
    assert a[0] < mean < a[1]
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * se, rel=0.15)  # close to the normal interval at n 200
    assert stats.bootstrap_mean(values, seed="y") != a


def test_paired_bootstrap_sees_a_real_difference_and_not_a_null_one():
    rng = random.Random(2)
    first = [rng.random() for _ in range(300)]
    better = [v + 0.1 for v in first]
    out = stats.paired_bootstrap(first, better, seed=0)
    assert out["difference"] == pytest.approx(0.1) and out["low"] > 0 and out["p_value"] < 0.01
    same = stats.paired_bootstrap(first, [v + rng.choice((-0.1, 0.1)) for v in first], seed=0)
    assert same["low"] < 0 < same["high"] and same["p_value"] > 0.05


def test_every_metric_in_results_carries_its_interval_beside_stderr():
    rows = [{"uid": str(i), "correct": i % 3 != 0} for i in range(30)]
    entry = task_metrics(TASKS_BY_KEY["vqa_rad_closed"], rows)
    ci = entry["ci95"]
    assert ci["method"] == "wilson" and entry["stderr"] is not None
    assert (ci["low"], ci["high"]) == pytest.approx(stats.wilson(20, 30))
    rows = [{"uid": str(i), "recall": i / 10, "f1": 0.5, "exact_match": 0.0} for i in range(11)]
    entry = task_metrics(TASKS_BY_KEY["slake_open"], rows)
    assert entry["ci95"]["method"] == "bootstrap" and entry["ci95"]["low"] < 0.5 < entry["ci95"]["high"]
    assert entry["metrics"]["exact_match"]["ci95"]["method"] == "wilson"
