"""`hpcserve bench` / `python -m cluster.bench`: argument parsing and the output files.

The parser is built by `configure_parser` so the same options serve both the
`hpcserve` CLI (through `add_parser`) and the standalone module entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import orjson

if TYPE_CHECKING:
    from cluster.bench.progress import ProgressSink
    from cluster.bench.workload import Tokenizer

DESCRIPTION = """\
Load-test an OpenAI-compatible endpoint with streaming requests: a concurrency sweep
(fixed virtual users) and/or a QPS sweep (Poisson arrivals). Reports TTFT, inter-token
and end-to-end latency (P50/P90/P99), output tokens/s, requests/s and failures as JSON,
a markdown table and PNG plots. With --compare-url the same sweep runs against a second
endpoint (e.g. the bare engine), interleaved step by step, and ratios url / compare-url
are reported per step."""


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def _float_list(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return vals


def _json_object(text: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--extra-body is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError("--extra-body must be a JSON object")
    return obj


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    env_key = os.environ.get("HPCSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    t = p.add_argument_group("targets")
    t.add_argument("--url", help="base URL of the endpoint, e.g. http://127.0.0.1:8000/v1 "
                   "(default: the running hpcserve's, see --home)")
    t.add_argument("--model", help="model name sent in requests (default: the running "
                   "hpcserve's first model)")
    t.add_argument("--home", help="state directory of the running hpcserve whose endpoint "
                   "and model are the defaults (default $HPCSERVE_HOME or ~/.hpcserve)")
    t.add_argument("--api-key", default=env_key, help="bearer token (default: $HPCSERVE_API_KEY or $OPENAI_API_KEY)")
    t.add_argument("--name", default="service", help="label of --url in reports (default: service)")
    t.add_argument("--compare-url", help="second endpoint (e.g. the bare engine) measured in the same run")
    t.add_argument("--compare-model", help="model name at --compare-url (default: --model)")
    t.add_argument("--compare-api-key", help="bearer token for --compare-url (default: --api-key)")
    t.add_argument("--compare-name", default="bare", help="label of --compare-url in reports (default: bare)")

    w = p.add_argument_group("load")
    w.add_argument("--mode", choices=("chat", "completions"), default="chat", help="API to call (default: chat)")
    w.add_argument("--concurrency", type=_int_list, help="concurrency sweep, e.g. 1,16,64,128")
    w.add_argument("--qps", type=_float_list, help="QPS sweep with Poisson arrivals, e.g. 0.5,1,2")
    bound = w.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, help="seconds per step and target (default: 20)")
    bound.add_argument("--requests", type=int, help="requests per step and target")
    w.add_argument("--rounds", type=int, help="blocks per step, targets alternating (default: 2 with --compare-url, else 1)")
    w.add_argument("--max-concurrency", type=int, help="cap on in-flight requests in QPS steps (default: none)")
    w.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default: 128)")
    w.add_argument("--output-tokens", type=int, default=128, help="max_tokens per request (default: 128)")
    w.add_argument("--ignore-eos", action="store_true", help="send ignore_eos so every request makes --output-tokens")
    w.add_argument("--tokenizer", help="local tokenizer dir (transformers) for exact prompt lengths and token counts")
    w.add_argument("--no-usage", action="store_true", help="do not send stream_options.include_usage (count chunks)")
    w.add_argument("--extra-body", type=_json_object, help="JSON object merged into every request body")
    w.add_argument("--warmup", type=int, default=1, help="unmeasured requests per target before the sweep (default: 1)")
    w.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds (default: 600)")
    w.add_argument("--seed", type=int, default=0, help="seed for prompts and arrivals (default: 0)")

    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, help="output directory (default: bench-results/<UTC time>)")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` on an argparse subparsers object; the handler is `args.func(args)`
    and returns the exit status."""
    p = subparsers.add_parser(
        "bench", help="load-test an OpenAI-compatible endpoint", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configure_parser(p)
    p.set_defaults(func=run_from_args)
    return p


def _load_tokenizer(path: str) -> tuple[Tokenizer, Callable[[str], int]]:
    from transformers import AutoTokenizer  # slow import, only when asked for

    tok = AutoTokenizer.from_pretrained(path)
    return tok, lambda text: len(tok.encode(text, add_special_tokens=False))


def _validate(args: argparse.Namespace) -> str | None:
    if not args.concurrency and not args.qps:
        return "give --concurrency and/or --qps"
    if args.seed < 0:
        return "--seed must be >= 0"
    for name in ("prompt_tokens", "output_tokens", "requests", "rounds", "max_concurrency"):
        v = getattr(args, name)
        if v is not None and v < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    if args.duration is not None and args.duration <= 0:
        return "--duration must be > 0"
    if args.warmup < 0:
        return "--warmup must be >= 0"
    return None


def _running_service(home: str | None) -> tuple[str | None, str | None]:
    """(endpoint URL, first model) of the hpcserve running from ``home``, if any."""
    from cluster.config import load_run_config
    from cluster.head import HeadInfo
    from cluster.service import home_dir, run_dir_of
    run_dir = run_dir_of(home_dir(home))
    if not (run_dir / "head.json").exists():
        return None, None
    url = HeadInfo.load(run_dir).http_url + "/v1"
    try:
        apps = load_run_config(run_dir).serve.get("applications") or []
        models = [m["name"] for a in apps for m in (a.get("args") or {}).get("models", [])]
    except Exception:  # an unreadable config: the URL is still right
        models = []
    return url, (models[0] if models else None)


def run_from_args(args: argparse.Namespace) -> int:
    # Imported here: numpy, matplotlib and the client take seconds, which every other
    # `hpcserve` command (they share this parser) would pay.
    from cluster.bench.plots import write_plots
    from cluster.bench.progress import NullProgress, RichProgress
    from cluster.bench.report import build_report, markdown, write_outputs
    from cluster.bench.runner import BenchConfig, BenchError, Step, Target, run_bench
    from cluster.bench.workload import PromptFactory
    if not args.url or not args.model:
        url, model = _running_service(args.home)
        args.url, args.model = args.url or url, args.model or model
        if not args.url or not args.model:
            print("hpcserve bench: error: give --url and --model (no running hpcserve found "
                  "to take them from)", file=sys.stderr)
            return 2
    error = _validate(args)
    if error:
        print(f"hpcserve bench: error: {error}", file=sys.stderr)
        return 2
    targets = [Target(args.name, args.url, args.model, args.api_key)]
    if args.compare_url:
        targets.append(
            Target(args.compare_name, args.compare_url, args.compare_model or args.model, args.compare_api_key or args.api_key)
        )
    steps = [Step("concurrency", float(c)) for c in args.concurrency or []]
    steps += [Step("qps", q) for q in args.qps or []]
    rounds = args.rounds or (2 if len(targets) > 1 else 1)
    duration = args.duration if args.duration is not None or args.requests is not None else 20.0
    try:
        config = BenchConfig(
            steps=steps, mode=args.mode, duration=duration, requests=args.requests, rounds=rounds,
            ignore_eos=args.ignore_eos, include_usage=not args.no_usage, extra_body=args.extra_body,
            max_concurrency=args.max_concurrency, warmup=args.warmup, timeout=args.timeout, seed=args.seed,
        )
    except ValueError as exc:
        print(f"hpcserve bench: error: {exc}", file=sys.stderr)
        return 2
    tokenizer, count_tokens = _load_tokenizer(args.tokenizer) if args.tokenizer else (None, None)
    factory = PromptFactory(args.prompt_tokens, args.output_tokens, seed=args.seed, tokenizer=tokenizer)
    out_dir: Path = args.out or Path("bench-results") / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())

    progress: ProgressSink = NullProgress() if args.no_progress else RichProgress()
    started = time.time()
    try:
        run = asyncio.run(run_bench(targets, config, factory, progress, count_tokens))
    except BenchError as exc:
        print(f"hpcserve bench: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    meta = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "elapsed_s": time.time() - started,
        "tokenizer": args.tokenizer,
        "argv": sys.argv[1:],
    }
    report = build_report(run, meta)
    paths = write_outputs(run, report, out_dir)
    if not args.no_plots:
        paths += write_plots(report, out_dir)
    sys.stdout.write(markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    any_ok = any(r.ok for b in run.blocks for r in b.results)
    return 0 if any_ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hpcserve bench", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    configure_parser(parser)
    return run_from_args(parser.parse_args(argv))
