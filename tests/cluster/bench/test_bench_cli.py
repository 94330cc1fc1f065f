"""The CLI end to end: files written, what they contain, compare mode, usage errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from cluster.bench.cli import add_parser, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_cli_writes_json_markdown_and_plots(fake_server: Callable[..., Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    srv = fake_server(chunks=8, first_delay=0.01, chunk_delay=0.002)
    out = tmp_path / "run"
    rc = main([
        "--url", srv.url, "--model", "tiny", "--concurrency", "1,4", "--requests", "6",
        "--prompt-tokens", "32", "--output-tokens", "8", "--ignore-eos", "--warmup", "0", "--out", str(out),
    ])
    assert rc == 0
    report = json.loads((out / "bench.json").read_text())
    assert [s["label"] for s in report["steps"]] == ["c=1", "c=4"]
    for step in report["steps"]:
        s = step["results"]["service"]
        assert (s["ok"], s["failed"], s["output_tokens"]) == (6, 0, 48)
        assert s["ttft_ms"]["p50"] >= 10.0 and "ratio" not in step
    assert report["meta"]["prompt_tokens"] == 32 and report["meta"]["ignore_eos"] is True
    md = (out / "bench.md").read_text()
    assert "| target | step | ok | failed |" in md and "| service | c=4 | 6 | 0 |" in md
    assert capsys.readouterr().out == md  # the table also goes to stdout
    assert len((out / "requests.jsonl").read_text().splitlines()) == 12
    for name in ("latency_vs_concurrency.png", "throughput_vs_concurrency.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not (out / "ratio_vs_concurrency.png").exists()
    body = srv.bodies[0]
    assert body["model"] == "tiny" and body["max_tokens"] == 8 and body["ignore_eos"] is True
    assert len(body["messages"][0]["content"].split()) == 32


def test_cli_compare_qps_with_progress(fake_server: Callable[..., Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bare = fake_server(chunks=4, first_delay=0.005, chunk_delay=0.002)
    service = fake_server(chunks=4, first_delay=0.04, chunk_delay=0.002)
    rc = main([
        "--url", service.url, "--compare-url", bare.url, "--model", "m", "--mode", "completions",
        "--qps", "20,40", "--requests", "6", "--output-tokens", "4", "--out", str(tmp_path),
    ])
    assert rc == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["meta"]["rounds"] == 2
    assert all(s["ratio"]["ttft_ms.p50"] > 1.5 for s in report["steps"])
    assert "Ratios service / bare" in (tmp_path / "bench.md").read_text()
    for name in ("latency_vs_qps.png", "throughput_vs_qps.png", "ratio_vs_qps.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    err = capsys.readouterr().err
    assert "service qps=40 round 2/2" in err and "bare qps=20 round 1/2" in err  # the progress bar


def test_add_parser_registers_bench() -> None:
    parser = argparse.ArgumentParser(prog="hpcserve")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--url", "http://x/v1", "--model", "m", "--concurrency", "1,16,64,128"])
    assert args.command == "bench" and args.concurrency == [1, 16, 64, 128] and callable(args.func)


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", "http://x/v1", "--model", "m"]) == 2
    assert "--concurrency and/or --qps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--url", "http://x/v1", "--model", "m", "--concurrency", "0,4"])
    with pytest.raises(SystemExit):
        main(["--url", "http://x/v1", "--model", "m", "--qps", "1", "--requests", "5", "--duration", "3"])


def test_cli_dead_endpoint_exits_1(closed_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--url", f"http://127.0.0.1:{closed_port}/v1", "--model", "m", "--concurrency", "1",
               "--requests", "1", "--out", str(tmp_path), "--no-progress"])
    assert rc == 1 and "every warmup request failed" in capsys.readouterr().err


def test_cli_defaults_url_and_model_to_the_running_service(
        fake_server: Callable[..., Any], tmp_path: Path) -> None:
    """`hpcserve bench` with no --url/--model measures the service `up` started from --home."""
    srv = fake_server(chunks=4, first_delay=0.0, chunk_delay=0.0)
    run_dir = tmp_path / "home" / "run"
    run_dir.mkdir(parents=True)
    base = srv.url.removesuffix("/v1")
    (run_dir / "head.json").write_text(json.dumps({
        "pid": 1, "node_ip": "127.0.0.2", "gcs_address": "127.0.0.2:1", "dashboard_url": "x",
        "metrics_port": 1, "http_url": base, "temp_dir": "x", "token_path": "x"}))
    (run_dir / "config.yaml").write_text(
        "applications:\n- name: a\n  import_path: serve_app.app:build_app\n"
        "  args: {models: [{name: first-model}, {name: second}]}\n")
    out = tmp_path / "run"
    rc = main(["--home", str(tmp_path / "home"), "--concurrency", "1", "--requests", "2",
               "--warmup", "0", "--out", str(out), "--no-progress", "--no-plots"])
    assert rc == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["steps"][0]["results"]["service"]["ok"] == 2
    assert {t["url"]: t["model"] for t in report["targets"]} == {srv.url: "first-model"}


def test_cli_without_url_or_a_running_service_says_what_to_give(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--home", str(tmp_path), "--concurrency", "1"]) == 2
    assert "give --url and --model" in capsys.readouterr().err
