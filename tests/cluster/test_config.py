"""Config errors name the field, for both the hpcserve section and the app args."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from cluster.config import load_config
from serve_app.config import ConfigError, parse_app_config

APP = {"name": "a", "import_path": "serve_app.app:build_app",
       "args": {"models": [{"name": "m"}]}}


def _write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_embedded_default_is_valid():
    config = load_config()
    assert config.cluster.pools[0].provider == "local"
    assert config.http_port == 8100


@pytest.mark.parametrize("data, field", [
    ({"hpcserve": {"pools": [{"name": "p", "walltime_s": 10}]}, "applications": [APP]},
     "hpcserve.pools.0.walltime_s"),
    ({"hpcserve": {"pools": [{"name": "p", "provider": "pbs"}]}, "applications": [APP]},
     "hpcserve.pools.0.provider"),
    ({"hpcserve": {"head": {"gcs_port": 70000}}, "applications": [APP]},
     "hpcserve.head.gcs_port"),
    ({"hpcserve": {"pools": [{"name": "p", "walltim_s": 100}]}, "applications": [APP]},
     "hpcserve.pools.0.walltim_s"),
    ({"applications": [{**APP, "args": {"models": [{"name": "m", "engine": "tgi"}]}}]},
     "applications.0.args.models.0.engine"),
    ({"applications": [{**APP, "args": {"models": []}}]}, "applications.0.args.models"),
    ({"applications": [{**APP, "args": {"models": [
        {"name": "m", "autoscaling": {"min_replicas": 3, "max_replicas": 1}}]}}]},
     "applications.0.args.models.0.autoscaling"),
    # several models served directly are routed by HAProxy from the app at `/`
    ({"applications": [{**APP, "route_prefix": "/x", "args": {"ingress": "direct", "models": [
        {"name": "m"}, {"name": "n"}]}}]}, "applications.0.route_prefix"),
    ({"applications": [{**APP, "args": {"ingress": "proxy", "models": [{"name": "m"}]}}]},
     "applications.0.args.ingress"),
    ({"applications": [{**APP, "args": {"ingress": "direct", "models": [
        {"name": "m", "autoscaling": {"min_replicas": 0}}]}}]}, "applications.0.args.ingress"),
    ({"applications": [{"name": "a"}]}, "applications.0.import_path"),
    # provider options are typed per provider and checked at load time
    ({"hpcserve": {"pools": [{"name": "p", "provider": "slurm",
                              "provider_options": {"partion": "gpu"}}]},
      "applications": [APP]}, "hpcserve.pools.0.provider_options.partion"),
    ({"hpcserve": {"pools": [{"name": "p", "provider": "slurm",
                              "provider_options": {"command_timeout_s": "soon"}}]},
      "applications": [APP]}, "hpcserve.pools.0.provider_options.command_timeout_s"),
    ({"hpcserve": {"pools": [{"name": "p", "provider": "local",
                              "provider_options": {"queue_delay": 3}}]},
      "applications": [APP]}, "hpcserve.pools.0.provider_options.queue_delay"),
    ({"hpcserve": {"pools": [{"name": "p", "provider": "heappe",
                              "provider_options": {"base_url": "https://h", "clusterid": 1}}]},
      "applications": [APP]}, "hpcserve.pools.0.provider_options.clusterid"),
    # elastic pools: the old name, a floor above the cap, a model that fits no pool
    ({"hpcserve": {"pools": [{"name": "p", "allocations": 2}]}, "applications": [APP]},
     "'allocations' is now 'min_allocations'"),
    ({"hpcserve": {"pools": [{"name": "p", "min_allocations": 3, "max_allocations": 2}]},
      "applications": [APP]}, "max_allocations must be >= min_allocations"),
    ({"applications": [{**APP, "args": {"models": [{"name": "m", "num_gpus": 1}]}}]},
     "applications.0.args.models.0.resources"),
    # failover is on, off or auto; whether a pool shares the head's cores, yes or no
    ({"applications": [{**APP, "args": {"models": [{"name": "m", "failover": "sometimes"}]}}]},
     "applications.0.args.models.0.failover"),
    ({"hpcserve": {"pools": [{"name": "p", "shares_head_cores": "maybe"}]},
      "applications": [APP]}, "hpcserve.pools.0.shares_head_cores"),
    # no key, yet beyond loopback
    ({"http_options": {"host": "0.0.0.0"}, "applications": [APP]}, "http_options.host"),
    ({"hpcserve": {}}, "applications"),
    ("applications: [unclosed", "not valid YAML"),
])
def test_config_error_names_the_field(tmp_path, data, field):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert field in str(err.value)


def test_a_model_that_scales_to_zero_needs_the_routed_ingress(tmp_path):
    """Explicit ``direct`` could not bound a cold request's wait (cold_start_timeout_s):
    refused at up/deploy, saying why; ``auto`` picks ``routed`` for it."""
    cold = {"name": "m", "cold_start_timeout_s": 60, "autoscaling": {"min_replicas": 0}}
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, {"applications": [
            {**APP, "args": {"ingress": "direct", "models": [cold]}}]}))
    message = str(err.value)
    assert "applications.0.args.ingress" in message and "routed ingress" in message
    assert "min_replicas: 0" in message and "cold_start_timeout_s" in message
    for ingress in ("auto", "routed"):
        config = load_config(_write(tmp_path, {"applications": [
            {**APP, "args": {"ingress": ingress, "models": [cold]}}]}))
        args = config.serve["applications"][0]["args"]
        assert parse_app_config(args).ingress_mode == "routed"
    warm = {**cold, "autoscaling": {"min_replicas": 1}}
    config = load_config(_write(tmp_path, {"applications": [
        {**APP, "args": {"ingress": "direct", "models": [warm]}}]}))
    assert parse_app_config(config.serve["applications"][0]["args"]).ingress_mode == "direct"


def test_cli_reports_config_error_without_traceback(tmp_path):
    path = _write(tmp_path, {"hpcserve": {"pools": [{"name": "p", "walltime_s": 1}]},
                             "applications": [APP]})
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "up", "-c", path,
                           "--home", str(tmp_path / "home")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "hpcserve.pools.0.walltime_s" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "home" / "run" / "head.json").exists()


def test_provider_options_are_typed_not_just_named(tmp_path):
    good = {"hpcserve": {"pools": [{"name": "p", "provider": "slurm", "provider_options": {
        "partition": "gpu", "extra_args": ["--qos=normal"], "command_timeout_s": 5}}]},
        "applications": [APP]}
    options = load_config(_write(tmp_path, good)).cluster.pools[0].provider_options
    assert options["partition"] == "gpu"


def test_loopback_without_keys_keeps_every_serve_socket_on_loopback(tmp_path):
    config = load_config(_write(tmp_path, {"http_options": {"host": "127.0.0.1"},
                                           "applications": [APP]}))
    assert not config.authenticated and config.warnings() == []
    assert config.serve["http_options"]["host"] == "127.0.0.1"  # replicas, fallback proxy


def test_keys_open_the_replica_binds_and_keep_the_configured_host(tmp_path):
    keyed = {**APP, "args": {**APP["args"], "api_keys": ["k1"]}}
    config = load_config(_write(tmp_path, {"http_options": {"host": "192.0.2.7"},
                                           "applications": [keyed]}))
    assert config.authenticated and config.http_host == "192.0.2.7"
    assert config.serve["http_options"]["host"] == "0.0.0.0"  # HAProxy must reach replicas


def test_allow_unauthenticated_is_an_explicit_choice_that_up_warns_about(tmp_path):
    config = load_config(_write(tmp_path, {"hpcserve": {"allow_unauthenticated": True},
                                           "http_options": {"host": "0.0.0.0"},
                                           "applications": [APP]}))
    (warning,) = config.warnings()
    assert "no API key" in warning and "0.0.0.0" in warning


def test_apps_taking_credentials_get_the_heads_access_store(tmp_path):
    def app(name, **args):
        return {**APP, "name": name, "route_prefix": f"/{name}",
                "args": {**APP["args"], **args}}
    apps = [app("managed", access={"managed_keys": True}),
            app("oidc", access={"oidc": {"issuer": "https://sso", "audience": "hpcserve",
                                         "jwks_file": "/etc/jwks.json"}}),
            app("static", api_keys=["k1"]),
            app("own", access={"managed_keys": True, "store": "/srv/own.db"}),
            app("open")]
    path = _write(tmp_path, {"http_options": {"host": "127.0.0.1"}, "applications": apps})
    config = load_config(path, access_store=tmp_path / "access.db")
    stores = {a["name"]: (a["args"].get("access") or {}).get("store")
              for a in config.serve["applications"]}
    assert stores == {"managed": str(tmp_path / "access.db"),
                      "oidc": str(tmp_path / "access.db"),
                      "static": str(tmp_path / "access.db"),
                      "own": "/srv/own.db", "open": None}
    with pytest.raises(ConfigError, match="access.store: managed_keys needs"):
        load_config(path)  # `serve deploy`-like: no home, no store


def test_managed_keys_or_oidc_alone_may_serve_beyond_loopback(tmp_path):
    for access in ({"managed_keys": True},
                   {"oidc": {"issuer": "https://sso", "audience": "a", "jwks_url": "https://j"}}):
        keyed = {**APP, "args": {**APP["args"], "access": access}}
        config = load_config(_write(tmp_path, {"http_options": {"host": "192.0.2.7"},
                                               "applications": [keyed]}),
                             access_store=tmp_path / "access.db")
        assert config.authenticated and config.serve["http_options"]["host"] == "0.0.0.0"
    with pytest.raises(ConfigError, match="access.managed_keys or access.oidc"):
        load_config(_write(tmp_path, {"http_options": {"host": "192.0.2.7"},
                                      "applications": [APP]}))
