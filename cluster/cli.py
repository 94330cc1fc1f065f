"""The `hpcserve` command: up, down, status, deploy, keys, usage, bench, build-model."""

from __future__ import annotations

import argparse
import json
import sys
import time

from serve_app.config import ConfigError


def _cmd_up(args) -> int:
    from cluster.model_routes import relayed_models
    from cluster.service import StartBlocked, home_dir, up
    try:
        head = up(args.config, home_dir(args.home), wait=not args.no_wait,
                  timeout_s=args.timeout)
    except ConfigError as err:
        print(f"hpcserve: {err}", file=sys.stderr)
        return 2
    except StartBlocked as err:
        print(f"hpcserve: {err}\nThe service stays up and the pool keeps trying: `hpcserve "
              "status` shows it, `hpcserve down` stops it.", file=sys.stderr)
        return 1
    except TimeoutError as err:
        print(f"hpcserve: {err}\nThe service keeps starting: `hpcserve status` shows where it "
              "is, `hpcserve down` stops it.", file=sys.stderr)
        return 1
    relayed = relayed_models(head)
    relay = (f"\nrelay:     {head.relay_metrics_url} (mid-stream failover: "
             f"{', '.join(relayed)})") if relayed else ""
    print(f"\nendpoint:  {head.http_url}/v1\ndashboard: {head.dashboard_url}"
          f"\nmetrics:   {head.metrics_url} (head); all nodes:"
          f" Prometheus file_sd {head.prometheus_file_sd}"
          f"\ncontrol:   {head.control_metrics_url} (the pools' decisions){relay}"
          f"\nupdate:    serve deploy {home_dir(args.home)}/run/serve.yaml -a {head.dashboard_url}"
          " (RAY_AUTH_TOKEN_PATH=" + head.token_path + ")")
    return 0


def _cmd_down(args) -> int:
    from cluster.service import down, home_dir
    down(home_dir(args.home))
    return 0


def _cmd_status(args) -> int:
    from cluster.service import home_dir
    from cluster.status import collect, render
    status = collect(home_dir(args.home))
    print(json.dumps(status, indent=2, default=str) if args.json else render(status))
    return 0 if status.get("running") else 1


def _cmd_control(args) -> int:
    """Start the control loop's supervisor again (if it was stopped); jobs are re-adopted."""
    from cluster.head import HeadInfo
    from cluster.service import home_dir, run_dir_of, start_control
    run_dir = run_dir_of(home_dir(args.home))
    try:
        pid = start_control(run_dir, HeadInfo.load(run_dir))
    except RuntimeError as err:
        print(f"hpcserve: {err}", file=sys.stderr)
        return 1
    print(f"control loop supervisor pid {pid}")
    return 0


def _cmd_deploy(args) -> int:
    from cluster.config import access_store_of, ingress_mode_changes, load_config, load_run_config
    from cluster.head import HeadInfo, deploy_serve, serve_status
    from cluster.service import home_dir, run_dir_of
    home = home_dir(args.home)
    try:
        config = load_config(args.config, access_store=access_store_of(home))
    except ConfigError as err:
        print(f"hpcserve: {err}", file=sys.stderr)
        return 2
    from cluster.batches import set_batch_paths
    set_batch_paths(config, home)
    head = HeadInfo.load(run_dir_of(home))
    import httpx
    import yaml

    from cluster import model_routes
    try:  # the pools the service runs, from its `up` (a deploy does not change them)
        pools = load_run_config(run_dir_of(home)).cluster.pools
    except (ConfigError, OSError):
        pools = config.cluster.pools
    decided = model_routes.with_failover(head, config.serve, pools)
    for change in ingress_mode_changes(serve_status(head), decided):
        print(f"hpcserve: note: {change}", file=sys.stderr)
    relayed_before, maps = model_routes.relayed_models(head), model_routes.saved_maps(head)
    serve_config, relayed_now = model_routes.publish(head, decided)
    try:
        deploy_serve(head, serve_config)
    except (RuntimeError, httpx.HTTPError) as err:
        model_routes.restore_maps(maps)  # what runs is the config deployed before
        print(f"hpcserve: {err}", file=sys.stderr)
        return 1
    for change in model_routes.failover_changes(relayed_before, relayed_now):
        print(f"hpcserve: note: {change}", file=sys.stderr)
    (run_dir_of(home) / "serve.yaml").write_text(yaml.safe_dump(serve_config, sort_keys=False))
    print("deployed")
    return 0


def _cmd_build_model(args) -> int:
    from serve_app.tiny_model import ensure_tiny_model
    t0 = time.monotonic()
    print(ensure_tiny_model(args.cache_dir), f"({time.monotonic() - t0:.1f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_home(p):
        p.add_argument("--home", help="state directory (default $HPCSERVE_HOME or ~/.hpcserve)")
        return p

    p = with_home(sub.add_parser("up", help="start head, Serve and the control loop"))
    p.add_argument("-c", "--config", help="config YAML (default: the embedded local default)")
    p.add_argument("--no-wait", action="store_true", help="return before models serve")
    p.add_argument("--timeout", type=float, default=600, metavar="SECONDS",
                   help="wait this long for every model to serve (default 600 s)")
    p.set_defaults(func=_cmd_up)
    with_home(sub.add_parser("down", help="stop everything `up` started")).set_defaults(
        func=_cmd_down)
    p = with_home(sub.add_parser("status", help="allocations, models, replicas"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)
    with_home(sub.add_parser("control", help="start the control loop's supervisor again (the "
              "supervisor itself restarts a loop that dies)")
              ).set_defaults(func=_cmd_control)
    p = with_home(sub.add_parser("deploy", help="update models/autoscaling in place"))
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=_cmd_deploy)
    p = sub.add_parser("build-model", help="build the tiny local model")
    p.add_argument("--cache-dir")
    p.set_defaults(func=_cmd_build_model)
    from cluster.access_cli import add_parsers as add_access
    add_access(sub, with_home)
    from cluster.batches import add_parser as add_batches
    add_batches(sub, with_home)
    from cluster.bench.cli import add_parser as add_bench
    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
