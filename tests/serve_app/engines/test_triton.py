"""TritonEngine end to end: hpcserve up -> OpenAI client -> real tritonserver.

One stack serves two models through one real Triton server (the binary inside
nvidia-pytriton) hosting the tiny model as a decoupled Python-backend model:

* ``tiny-grpc`` starts the server (gRPC ``stream_infer``, delta output, exact token
  counts from the backend);
* ``tiny-http`` connects to that server by ``url`` (HTTP ``generate_stream``,
  cumulative output, token counts estimated), as a job-managed server would be used.

Outputs must equal greedy ``transformers.generate`` on the same rendered prompt.
The kill test SIGKILLs exactly the server whose command line names this test's
repository, and expects an SSE error event, then recovery by Serve's health check.

The 2.51 Python-backend stub is built against numpy 1 and corrupts BYTES inputs
under numpy 2, so the stub runs in a small env with numpy<2 that reuses this venv's
packages (``stub_env``; docs/triton.md, "numpy").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import yaml

from cluster.ports import free_ports
from serve_app.protocol import ChatMessage, GenerateRequest
from serve_app.templating import render_prompt
from serve_app.triton_models.repository import write_tiny_repository

pytest.importorskip("tritonclient.grpc.aio")
pytest.importorskip("pytriton", reason="the tritonserver binary comes with nvidia-pytriton")

MAX_TOKENS = 12
CHAT = [{"role": "user", "content": "Hello, which node is this?"}]
PROMPT = "The batch job on the cluster"


@pytest.fixture(scope="session")
def stub_env(model_cache: str) -> str | None:
    """A python env for the Triton stub: numpy<2 first, then this venv's site-packages."""
    if int(np.__version__.split(".")[0]) < 2:
        return None
    built = Path(__file__).resolve().parents[3] / ".venv-triton-stub"  # by scripts/setup
    if list(built.glob("lib/python*/site-packages/numpy")):
        return str(built)
    env = Path(model_cache) / "triton-stub-env"
    site = env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    if not (site / "numpy").is_dir():
        subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(env)], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(site), "numpy==1.26.4"], check=True)
        (site / "zz-hpcserve.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(env)


@pytest.fixture(scope="module")
def triton(hpcserve_stack, tiny_model_dir: Path, stub_env, tmp_path_factory):
    repo = write_tiny_repository(tmp_path_factory.mktemp("triton-repo") / "repo", tiny_model_dir)
    http_port, grpc_port = free_ports(2)
    common = {"triton_model": "tiny_llm", "tokenizer": str(tiny_model_dir)}
    model = {"max_model_len": 2048, "resources": {"hpc_slot": 0.25},
             "health_check_period_s": 1.0, "health_check_timeout_s": 10.0}
    config = {
        "hpcserve": {"pools": [{"name": "local", "provider": "local", "min_allocations": 1,
                                "walltime_s": 3600, "resources": {"hpc_slot": 1}}]},
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 0},
        "logging_config": {"enable_access_log": False},
        "applications": [{"name": "hpcserve", "route_prefix": "/",
                          "import_path": "serve_app.app:build_app", "args": {"models": [
            {"name": "tiny-grpc", "engine": "triton", **model, "engine_args": {
                **common, "model_repository": str(repo), "python_env": stub_env,
                "http_port": http_port, "grpc_port": grpc_port,
                "outputs": {"finish_reason": "finish_reason",
                            "num_output_tokens": "num_output_tokens"}}},
            {"name": "tiny-http", "engine": "triton", **model, "engine_args": {
                **common, "url": f"127.0.0.1:{http_port}", "protocol": "http",
                "output_mode": "cumulative", "extra_inputs": {"cumulative_output": True},
                "outputs": {"finish_reason": "finish_reason"}}},
            # Told a context 50x the model's, so only Triton's backend can refuse a
            # long prompt: its INVALID_ARG must reach the client as a 400.
            {"name": "tiny-grpc-unchecked", "engine": "triton", **model,
             "max_model_len": 102400, "engine_args": {
                **common, "url": f"127.0.0.1:{grpc_port}", "max_model_len": 102400,
                "outputs": {"finish_reason": "finish_reason"}}},
        ]}}],
    }
    started = time.monotonic()
    stack = hpcserve_stack(yaml.safe_dump(config), name="triton")
    stack.startup_s = time.monotonic() - started
    stack.repo = repo
    yield stack
    stack.down()
    leftovers = _servers(repo, stubs=True)
    for pid in leftovers:  # should be none: report, but never leave them running
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"tritonserver or its stubs still running after down: {leftovers}"
    assert not _stale_shm(), "Triton /dev/shm segments left behind"


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    """Greedy transformers output for a request, as the Triton model should produce it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()

    def generate(messages=None, prompt=None, max_tokens=MAX_TOKENS) -> tuple[str, str, int]:
        req = GenerateRequest(request_id="ref", model="ref", prompt=prompt,
                              messages=[ChatMessage(**m) for m in messages] if messages else None)
        ids = tokenizer(render_prompt(tokenizer, req), return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        finish = "stop" if new[-1] == model.generation_config.eos_token_id else "length"
        return tokenizer.decode(new, skip_special_tokens=True), finish, len(new)

    return generate


def _servers(repo: Path, stubs: bool = False) -> list[int]:
    """PIDs of tritonserver processes serving exactly this test's repository (with
    ``stubs``: also their Python backend stubs, which name the repository too)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        ours = argv[0].endswith(b"tritonserver") and str(repo).encode() in argv
        if stubs:
            ours = ours or (argv[0].endswith(b"triton_python_backend_stub")
                            and any(str(repo).encode() in a for a in argv))
        if ours and state != "Z":
            pids.append(int(pid))
    return pids


def _stale_shm() -> list[str]:
    """Our servers' shm segments whose owning replica (PID in the name) is gone."""
    stale = []
    for name in os.listdir("/dev/shm"):
        if name.startswith("hpcserve-triton-"):
            owner = name.split("-")[2]
            if not Path(f"/proc/{owner}").exists():
                stale.append(name)
    return stale


def test_models_listed(triton):
    ids = {m.id for m in triton.client().models.list().data}
    assert {"tiny-grpc", "tiny-http"} <= ids
    print(f"stack with Triton ready in {triton.startup_s:.1f}s")


@pytest.mark.parametrize("model", ["tiny-grpc", "tiny-http"])
def test_outputs_match_transformers(triton, reference, model):
    client = triton.client()
    chat_text, chat_finish, chat_n = reference(messages=CHAT)
    comp_text, comp_finish, comp_n = reference(prompt=PROMPT)
    opts = dict(model=model, max_tokens=MAX_TOKENS, temperature=0)

    reply = client.chat.completions.create(messages=CHAT, **opts)
    assert reply.choices[0].message.content == chat_text
    assert reply.choices[0].finish_reason == chat_finish
    if model == "tiny-grpc":  # exact counts come from the backend's num_output_tokens
        assert reply.usage.completion_tokens == chat_n

    chunks = list(client.chat.completions.create(messages=CHAT, stream=True, **opts))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat_finish

    reply = client.completions.create(prompt=PROMPT, **opts)
    assert reply.choices[0].text == comp_text
    assert reply.choices[0].finish_reason == comp_finish
    chunks = list(client.completions.create(prompt=PROMPT, stream=True, **opts))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == comp_text
    # continuous usage stats: the prompt's size from the first chunk on (the engine
    # reports it with its first delta), completion tokens so far, the whole at the end
    chunks = list(client.completions.create(prompt=PROMPT, stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}, **opts))
    assert {c.usage.prompt_tokens for c in chunks} == {reply.usage.prompt_tokens}
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == reply.usage.completion_tokens


def test_bad_request_is_a_4xx(triton):
    with pytest.raises(openai.BadRequestError, match="context length"):
        triton.client().completions.create(model="tiny-grpc", prompt=PROMPT * 400, max_tokens=8)


@pytest.mark.parametrize("stream", [False, True])
def test_request_triton_refuses_is_a_4xx(triton, stream):
    """hpcserve's own length check passes; the backend's ValueError comes back over
    gRPC as INVALID_ARGUMENT and must be the client's 400, not a 5xx."""
    client = triton.client()
    with pytest.raises(openai.BadRequestError, match="exceeds the context length") as err:
        reply = client.completions.create(model="tiny-grpc-unchecked", prompt=PROMPT * 400,
                                          max_tokens=8, stream=stream)
        if stream:
            list(reply)
    assert err.value.status_code == 400
    assert "Traceback" not in str(err.value)
    # ... and the model still serves.
    reply = client.completions.create(model="tiny-grpc-unchecked", prompt=PROMPT, max_tokens=4)
    assert reply.choices[0].text


def test_server_killed_mid_stream(triton, reference):
    client = triton.client(timeout=60)
    [server] = _servers(triton.repo)
    stream = client.chat.completions.create(model="tiny-grpc", messages=CHAT, stream=True,
                                            max_tokens=1500, temperature=0,
                                            extra_body={"ignore_eos": True})
    received, started = [], time.monotonic()
    with pytest.raises(openai.APIError) as failure:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
            if len(received) == 5:
                os.kill(server, signal.SIGKILL)  # exactly the server of this test's repo
    assert received, "the stream failed before the kill"
    assert time.monotonic() - started < 60, "the client waited too long for the error"
    assert "engine" in str(failure.value).lower() or "replica" in str(failure.value).lower()

    text, _, _ = reference(messages=CHAT)
    deadline, last = time.monotonic() + 240, None
    while time.monotonic() < deadline:  # Serve's health check replaces the replica
        try:
            reply = client.chat.completions.create(model="tiny-grpc", messages=CHAT,
                                                   max_tokens=MAX_TOKENS, temperature=0)
            break
        except openai.APIError as exc:
            last = exc
            time.sleep(2)
    else:
        pytest.fail(f"no recovery within 240s: {last!r}")
    assert reply.choices[0].message.content == text
    assert _servers(triton.repo) and server not in _servers(triton.repo)
    assert not _stale_shm()
    # the model using the job's server by url recovers as well
    http_reply = None
    while time.monotonic() < deadline and http_reply is None:
        try:
            http_reply = client.chat.completions.create(model="tiny-http", messages=CHAT,
                                                        max_tokens=MAX_TOKENS, temperature=0)
        except openai.APIError:
            time.sleep(2)
    assert http_reply is not None and http_reply.choices[0].message.content == text
