"""The autoscaling decision (pagoda.cluster.autoscaling): requests or KV occupancy, whichever asks for more."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagoda.cluster.autoscaling import KV_METRIC, KVAwarePolicy, desired_replicas


def test_load_alone_follows_serves_rule():
    assert desired_replicas(2, ongoing=96, target_ongoing=32, kv_usages=[0.1, 0.1], target_kv_usage=0.8) == 3


def test_full_kv_scales_up_even_with_few_requests():
    assert desired_replicas(2, ongoing=4, target_ongoing=32, kv_usages=[1.0, 0.6], target_kv_usage=0.8) == 2.0
    assert desired_replicas(1, ongoing=2, target_ongoing=32, kv_usages=[0.96], target_kv_usage=0.8) == pytest.approx(1.2)


def test_idle_asks_for_nothing_and_no_reports_mean_load_only():
    assert desired_replicas(2, ongoing=0, target_ongoing=32, kv_usages=[0.0, 0.0], target_kv_usage=0.8) == 0
    assert desired_replicas(2, ongoing=32, target_ongoing=32, kv_usages=[], target_kv_usage=0.8) == 1
    assert desired_replicas(0, ongoing=5, target_ongoing=2, kv_usages=[], target_kv_usage=0.8) == 2.5


@given(current=st.integers(1, 16), ongoing=st.floats(0, 1e4), target=st.floats(0.5, 512),
       kv=st.lists(st.floats(0, 1), max_size=16), kv_target=st.floats(0.05, 1))
def test_never_below_either_signal_and_monotone_in_load(current, ongoing, target, kv, kv_target):
    d = desired_replicas(current, ongoing, target, kv, kv_target)
    assert d >= ongoing / target - 1e-9
    assert desired_replicas(current, ongoing * 2, target, kv, kv_target) >= d
    if kv:
        assert d >= current * (sum(kv) / len(kv)) / kv_target - 1e-9


def test_policy_reads_serves_context_and_ignores_stopped_replicas():
    ctx = SimpleNamespace(current_num_replicas=2, total_num_requests=4.0, running_replicas=["a", "b"],
                          aggregated_metrics={KV_METRIC: {"a": 0.9, "b": 0.7, "gone": 0.0}},
                          config=SimpleNamespace(get_target_ongoing_requests=lambda: 32.0))
    desired, state = KVAwarePolicy(target_kv_usage=0.4)(ctx)
    assert desired == pytest.approx(4.0) and state == {}
    ctx.aggregated_metrics = None  # no custom metrics reported yet
    assert KVAwarePolicy()(ctx)[0] == pytest.approx(4 / 32)


def test_bad_target_is_rejected():
    with pytest.raises(ValueError, match="target_kv_usage"):
        KVAwarePolicy(target_kv_usage=0)
