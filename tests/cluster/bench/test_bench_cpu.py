"""CPU per side of a comparison, read from /proc for real process trees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from cluster.bench.cpu import CpuAccount, LoadSampler, component

# burns 0.5 s of CPU, says so, then idles until killed (gone processes are not read)
SPIN = ("import time\nwhile time.process_time() < 0.5: pass\n"
        "print('spun', flush=True)\ntime.sleep(120)\n")


def test_each_side_is_charged_what_its_processes_burned(tmp_path):
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    (home / "jobs").mkdir()
    started: list[subprocess.Popen] = []
    try:
        cpu = CpuAccount(0, home)
        cpu.start()
        # hpcserve's side: a head whose child spins, a job (its .pid file) that spins
        head = subprocess.Popen([sys.executable, "-c", (
            "import subprocess, sys\n"
            f"subprocess.run([sys.executable, '-c', {SPIN!r}])\n")],
            stdout=subprocess.PIPE, text=True, start_new_session=True)  # its child too, below
        job = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
        bare = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
        started += [head, job, bare]
        cpu.bare_pid = bare.pid
        (home / "run" / "head.json").write_text(json.dumps({"pid": head.pid}))
        (home / "jobs" / "1.pid").write_text(str(job.pid))
        with LoadSampler() as load:
            for p in started:  # each has burned its 0.5 s
                assert p.stdout.readline().strip() == "spun"
        cpu.stop()
    finally:
        for p in started:
            if p is head:
                os.killpg(head.pid, signal.SIGKILL)
            p.kill()
            p.wait()
    bare_s = sum(v for k, v in cpu.used.items() if k.startswith("bare:"))
    ours_s = sum(v for k, v in cpu.used.items() if k.startswith("hpcserve:"))
    assert 0.45 <= bare_s < 1.0, cpu.used  # /proc counts in clock ticks
    assert 0.95 <= ours_s < 2.0, cpu.used  # the head's child and the job
    assert load.samples and "samples" in load.summary()


def test_processes_are_named_by_their_role():
    assert component("ray::ServeReplica:hpcserve:Ingress", False, False) == \
        "hpcserve: ingress replica"
    assert component("python -m vllm.entrypoints.openai.api_server", False, True) == \
        "bare: api_server (HTTP, detokenize)"
    assert component("VLLM::EngineCore", True, False) == "hpcserve: vLLM EngineCore + worker"
    assert component("/x/python -m cluster.failover_relay --port 1 --upstream h:2", False,
                     False) == "hpcserve: failover relay"
    for title in ("ray::ServeReplica:hpcserve:engine-tiny",        # routed, or direct
                  "ray::ServeReplica:hpcserve.m.tiny:engine-tiny"):  # a model's own app
        assert component(title, False, False) == "hpcserve: engine replica (AsyncLLM, Serve)"
