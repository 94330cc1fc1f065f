"""Profiles of the data path's processes: py-spy's stacks read back by layer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.bench.profile import Profile, Profiler, function_of, layer_of

RAW = """\
_run (asyncio/events.py:84);generate (serve_app/engines/deployment.py:90);coalesce (serve_app/engines/coalesce.py:110) 6
_run (asyncio/events.py:84);HandleRequestWithRejectionStreaming (ray/serve/_private/replica.py:2620);dumps (ray/cloudpickle/cloudpickle.py:1479) 3
_run (asyncio/events.py:84);_handle_rpc (grpc/_cython/_cygrpc/aio/server.pyx.pxi:700) 1
"""


def test_samples_are_counted_by_the_layer_and_function_of_their_leaf():
    prof = Profile.parse(RAW)
    assert prof.samples == 10
    assert prof.by_layer == {"hpcserve": 6, "Ray core": 3, "gRPC": 1}
    assert prof.by_leaf["coalesce (serve_app/engines/coalesce.py)"] == 6
    # Serve's frame is below the leaf: Ray's pickling is charged to Ray, not to Serve
    assert prof.by_ours == {"coalesce (serve_app/engines/coalesce.py)": 6,
                            "(no hpcserve frame)": 4}
    assert "| hpcserve | 60 % |" in prof.table("engine replica")


def test_frames_are_read_as_py_spy_prints_them():
    assert layer_of("dumps (json/__init__.py:231)") == "serialization"
    assert layer_of("route (ray/serve/_private/router.py:10)") == "Ray Serve"
    assert layer_of("thing (somewhere/else.py:1)") == "other"
    assert layer_of("send (site-packages/uvicorn/protocols/http/httptools_impl.py:9)") == \
        "HTTP (Starlette, uvicorn)"
    assert function_of("f (a/b.py:12)") == "f (a/b.py)"


def test_a_live_process_is_sampled_without_stopping_it(tmp_path):
    profiler = Profiler({}, tmp_path)
    if not profiler.available():
        pytest.skip("py-spy is installed with the client tools (scripts/setup --all)")
    spin = subprocess.Popen([sys.executable, "-c", (
        "import json, sys, time\n"
        "print('ready', flush=True)\n"
        "t = time.time()\n"
        "while time.time() - t < 20:\n"
        "    json.dumps({'a': list(range(200))})\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert spin.stdout.readline().strip() == "ready"
        profiler.targets = {"spinner": spin.pid}
        profiler.start()
        import time
        time.sleep(1.5)
        (prof,) = profiler.stop().values()
        assert spin.poll() is None  # sampled, never stopped
        if prof.error and "ermission" in " ".join(prof.error):
            pytest.skip(f"py-spy may not attach here: {prof.error}")
    finally:
        spin.kill()
        spin.wait()
    assert prof.samples > 20
    assert prof.by_layer.most_common(1)[0][0] == "serialization", prof.by_layer
