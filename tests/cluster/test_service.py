"""``hpcserve up`` on a pool that may not add a node: it says why, soon, instead of
waiting its whole timeout (the control loop's model state carries the reason)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import default_config


def test_up_stops_waiting_with_the_pools_reason_when_no_node_may_start(hpcserve_stack):
    # one job may use its whole wall-time (1 h): a 0.5 node-hour budget admits none
    config = default_config(pool={"walltime_s": 3600, "max_node_hours_per_day": 0.5})
    # well under the timeout a regression would run out (`up` waits 60 s of grace)
    with pytest.raises(AssertionError) as failed:
        hpcserve_stack(config, name="no-budget", timeout=300)
    out = str(failed.value)
    assert "model tiny cannot start: budget:" in out, out
    assert re.search(r"needs 1\.00 node-hours, 0\.50 left today", out), out
    assert "not ready after" not in out  # it did not wait for the timeout
    assert "The service stays up and the pool keeps trying" in out
