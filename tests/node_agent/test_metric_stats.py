"""EWMA and windowed p95 against a naive recomputation."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from node_agent.metric_stats import MetricStats
from node_agent.unit_shape import bandwidth_share, mig_profile_name, sm_count_from_cores

GIB = 1024**3


@given(st.lists(st.tuples(st.floats(0.01, 3.0), st.floats(0.0, 1.0)), min_size=1, max_size=80),
       st.floats(0.5, 20.0))
def test_p95_matches_a_naive_window(steps, window):
    s = MetricStats(halflife_s=5.0, window_s=window)
    t, seen = 0.0, []
    for dt, v in steps:
        t += dt
        s.add(t, v)
        seen.append((t, v))
        in_window = sorted(x for tt, x in seen if tt >= t - window)
        assert s.p95() == in_window[math.ceil(0.95 * len(in_window)) - 1]


def test_ewma_half_life_is_in_seconds():
    s = MetricStats(halflife_s=2.0, window_s=60)
    s.add(0.0, 0.0)
    s.add(2.0, 1.0)  # one half-life later: halfway
    assert s.ewma == 0.5
    s.add(2.0, float("nan"))  # ignored
    assert s.ewma == 0.5 and s.p95() == 1.0


def test_mig_profile_names_follow_nvidia_smi():
    h100 = 81559 * 1024**2
    h200 = 143771 * 1024**2
    assert mig_profile_name(1, 1, 9984, h100) == "1g.10gb"
    assert mig_profile_name(3, 3, 40448, h100) == "3g.40gb"
    assert mig_profile_name(7, 7, 81152, h100) == "7g.80gb"
    assert mig_profile_name(3, 3, 68096, h200) == "3g.71gb"  # 70.5 rounds half up
    assert mig_profile_name(3, 1, 40448, h100) == "1c.3g.40gb"
    assert bandwidth_share(20091, h100) == 0.25
    assert sm_count_from_cores(16896, (9, 0)) == 132
    assert sm_count_from_cores(6912, (8, 0)) == 108
