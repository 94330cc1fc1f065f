"""Config errors name the field, for both the hpcserve section and the app args."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from cluster.config import load_config
from serve_app.config import ConfigError

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
    ({"applications": [{**APP, "args": {"ingress": "direct", "models": [
        {"name": "m"}, {"name": "n"}]}}]}, "applications.0.args.ingress"),
    ({"applications": [{**APP, "args": {"ingress": "proxy", "models": [{"name": "m"}]}}]},
     "applications.0.args.ingress"),
    ({"applications": [{"name": "a"}]}, "applications.0.import_path"),
    ({"hpcserve": {}}, "applications"),
    ("applications: [unclosed", "not valid YAML"),
])
def test_config_error_names_the_field(tmp_path, data, field):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert field in str(err.value)


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
