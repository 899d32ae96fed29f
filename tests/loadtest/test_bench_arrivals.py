"""Arrival processes: requested rate and burstiness, statistically, with fixed seeds."""

import itertools
import math

import numpy as np
import pytest

from loadtest.arrivals import ClosedLoop, OpenLoop

N = 20_000


def gaps(load: OpenLoop, seed: int = 1) -> np.ndarray:
    return np.fromiter(itertools.islice(load.gaps(np.random.default_rng(seed)), N), dtype=np.float64, count=N)


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_poisson_has_the_requested_rate_and_cv_one(rate):
    sample = gaps(OpenLoop(rate))
    assert sample.mean() == pytest.approx(1 / rate, rel=0.03)
    assert sample.std() / sample.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 2.0, 8.0])
def test_gamma_keeps_the_rate_and_sets_cv_from_burstiness(burstiness):
    sample = gaps(OpenLoop(rate=5.0, burstiness=burstiness))
    assert sample.mean() == pytest.approx(0.2, rel=0.04)
    assert sample.std() / sample.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_burstier_arrivals_cluster_more():
    smooth, bursty = gaps(OpenLoop(5.0, 4.0)), gaps(OpenLoop(5.0, 0.25))
    # Bursty traffic packs many arrivals into tiny gaps and leaves long silences.
    assert (bursty < 0.02).mean() > 5 * (smooth < 0.02).mean()
    assert bursty.max() > 2 * smooth.max()


def test_send_times_start_at_zero_and_count_matches_rate_times_window():
    times = np.fromiter(itertools.islice(OpenLoop(10.0).send_times(np.random.default_rng(3)), N), dtype=np.float64)
    assert times[0] == 0.0
    assert np.all(np.diff(times) >= 0)
    assert np.sum(times < 1000.0) == pytest.approx(10_000, rel=0.03)


def test_same_seed_same_arrivals_different_seed_different():
    a, b, c = gaps(OpenLoop(2.0), seed=7), gaps(OpenLoop(2.0), seed=7), gaps(OpenLoop(2.0), seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_infinite_rate_sends_everything_at_once():
    times = list(itertools.islice(OpenLoop(math.inf).send_times(np.random.default_rng(0)), 50))
    assert times == [0.0] * 50


@pytest.mark.parametrize("rate, burstiness", [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, math.inf)])
def test_invalid_open_loop_is_rejected(rate, burstiness):
    with pytest.raises(ValueError):
        OpenLoop(rate, burstiness)


def test_closed_loop_needs_a_positive_concurrency():
    with pytest.raises(ValueError):
        ClosedLoop(0)
    assert ClosedLoop(3).describe() == "closed loop, 3 concurrent"
