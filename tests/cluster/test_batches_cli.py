"""``hpcserve up``'s batch paths and ``hpcserve batches``' progress line."""

from __future__ import annotations

from pathlib import Path

from cluster.batches import progress_line, set_batch_paths
from cluster.config import load_config
from tests.conftest import default_config


def test_up_puts_the_batch_files_and_store_under_its_home(tmp_path):
    import yaml
    cfg = default_config(args={"batch": {"enabled": True, "store": "state/b.db"}})
    cfg["applications"].append({**cfg["applications"][0], "name": "plain",
                                "route_prefix": "/plain",
                                "args": {"models": [{"name": "tiny"}]}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config(tmp_path / "c.yaml")
    set_batch_paths(config, tmp_path / "home")
    batch = config.serve["applications"][0]["args"]["batch"]
    assert batch == {"enabled": True, "files_dir": str(tmp_path / "home" / "files"),
                     "store": str(tmp_path / "home" / "state" / "b.db")}
    assert "batch" not in config.serve["applications"][1]["args"]
    assert Path(batch["files_dir"]).is_absolute()


def test_the_progress_line_has_rate_and_eta_while_running_and_totals_after():
    running = {"status": "in_progress", "in_progress_at": 1000,
               "request_counts": {"total": 2000, "completed": 480, "failed": 20},
               "usage": {"output_tokens": 4000}}
    assert progress_line(running, now=1100) == (
        "500/2000 (25%), 20 failed, 5.0 lines/s, 40 output tokens/s, ETA 5m00s")
    done = {**running, "status": "completed", "completed_at": 1400,
            "request_counts": {"total": 2000, "completed": 1980, "failed": 20}}
    assert progress_line(done, now=9999) == (
        "2000/2000 (100%), 20 failed, 5.0 lines/s, 10 output tokens/s, took 6m40s")
    assert progress_line({"status": "validating", "request_counts": {"total": 0}}) == (
        "0/0, 0 failed")
