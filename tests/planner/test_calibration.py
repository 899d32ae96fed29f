"""`--hardware local` against a measured `bench compare` run on this machine (real stacks, tiny-llama).

The same short compare run (20 long-prompt requests, Poisson, seed 0) is measured on two real
`pdserve up` stacks (colocated 2 x both, disagg 1 + 1) and predicted by the planner from a
profile of the same engine and the same stacks. Goals from the issue: P50 TTFT and mean
TPOT of each mode within 2x, and the direction of the P99 TTFT difference between the modes
when it is over 20%. The load is light enough (3 req/s) that neither mode saturates on this
shared 2-core machine: near saturation a small error in a step time multiplies into the
queue (docs/planner.md shows that case too). Why and when a measurement is repeated: the
`check` fixture and docs/planner.md ("Making the check robust").
"""

import pytest

from loadtest.arrivals import OpenLoop
from loadtest.bench import Plan
from loadtest.runner import Limits
from loadtest.workloads import LONG_PROMPT
from planner.calibrate import calibrate
from planner.profile import LocalProfile

pytestmark = pytest.mark.slow


# Probe spread (Check.probe_spread) at which noise alone can carry a ratio across the 2x
# tolerance: a miss at 2.08x came with a 1.9x spread (a quiet machine, CI-like run), and the
# profile the prediction is fitted from is a few such probes.
NOISY = 1.5


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """One calibration; measured once more, whole, only when its goals were missed *and* the
    machine was measurably noisy (the same single request's TTFT varied over 1.5x between
    probes a few seconds apart: other jobs on the two cores). The second is
    kept whatever it shows: a planner that is wrong fails both, and on a steady machine a
    miss fails at once."""
    plan = Plan(LONG_PROMPT, OpenLoop(3.0), Limits(num_requests=20), seed=0)
    first = calibrate("tiny-llama", plan, workers=2, out_dir=tmp_path_factory.mktemp("calibrate"))
    if first.goals_met() or first.probe_spread() <= NOISY:
        return first
    print(f"first calibration missed its goals on a noisy machine (probe spread {first.probe_spread():.1f}x):\n"
          f"{first.table()}\nmeasuring again")
    return calibrate("tiny-llama", plan, workers=2, out_dir=tmp_path_factory.mktemp("calibrate"))


@pytest.mark.parametrize("mode", ["colocated", "disagg"])
def test_p50_ttft_and_mean_tpot_are_within_2x_of_the_measurement(check, mode):
    print(check.table())
    assert check.measured[mode]["completed"] == 20 and check.predicted[mode]["completed"] == 20
    assert check.within(mode, "p50_ttft_ms"), check.table()
    assert check.within(mode, "mean_tpot_ms"), check.table()


def test_the_p99_ttft_difference_between_modes_points_the_same_way(check):
    measured, predicted, same = check.p99_direction()
    assert same is not False, check.table()


def test_the_profile_measured_every_mode_and_a_real_handoff(check):
    profile = LocalProfile.from_json(check.profile)
    assert set(profile.stacks) == {"colocated", "disagg"}
    assert profile.stacks["disagg"].kv_bytes > 0 and profile.stacks["disagg"].kv_seconds > 0  # over UCX
    assert profile.stacks["colocated"].kv_bytes == 0  # nothing handed off
    assert len(profile.steps) >= 8 and all(s.seconds > 0 for s in profile.steps)
