"""``build_app``: which deployments each ingress mode makes, before anything runs.

That the modes serve alike over HTTP is ``test_ingress.py``'s job (it runs both);
this checks what ``auto``, the default, picks.
"""

import pytest

from serve_app.app import build_app
from serve_app.config import parse_app_config


def _deployments(args: dict) -> tuple[str, list[str]]:
    """The app's ingress deployment and the engine deployments it routes to."""
    bound = build_app(args)._bound_deployment
    routed_to = bound.init_args[1] if bound.name == "Ingress" else {}
    return bound.name, sorted(app._bound_deployment.name for app in routed_to.values())


def test_auto_serves_one_model_directly_from_its_engine_replicas():
    assert _deployments({"models": [{"name": "a"}]}) == ("engine-a", [])


def test_several_models_not_split_by_hpcserve_up_are_all_served_by_the_router():
    """``auto`` is direct here, but only ``hpcserve up``/``deploy`` split an app
    (``cluster.model_routes``): a plain ``serve deploy`` of it gets the router."""
    assert _deployments({"models": [{"name": "a"}, {"name": "b"}]}) == (
        "Ingress", ["engine-a", "engine-b"])


def test_routed_can_be_asked_for_with_one_model():
    assert _deployments({"ingress": "routed", "models": [{"name": "a"}]}) == (
        "Ingress", ["engine-a"])


def test_a_split_app_routes_to_engines_in_apps_of_their_own_and_keeps_a_cold_one():
    """``hpcserve up`` splits ``direct`` with several models (``cluster.model_routes``):
    the router reaches the always-on models' engines by name, hosts the cold one."""
    from serve_app.layout import LAYOUT_ARG
    cold = {"name": "c", "autoscaling": {"min_replicas": 0, "max_replicas": 1}}
    args = {"ingress": "direct", "models": [{"name": "a"}, {"name": "b"}, cold],
            LAYOUT_ARG: {"model_apps": {"a": "hpcserve.m.a", "b": "hpcserve.m.b"}}}
    bound = build_app(args)._bound_deployment
    assert bound.name == "Ingress"
    assert sorted(d._bound_deployment.name for d in bound.init_args[1].values()) == ["engine-c"]
    assert bound.init_args[4] == {"a": ("engine-a", "hpcserve.m.a"),
                                  "b": ("engine-b", "hpcserve.m.b")}


def test_one_failover_model_split_off_leaves_the_router_without_an_engine():
    """Its requests reach its own app through the relay; the router keeps the rest
    (``/v1/models``) and holds no second engine for it."""
    from serve_app.layout import LAYOUT_ARG
    args = {"models": [{"name": "a", "failover": True}],
            LAYOUT_ARG: {"model_apps": {"a": "hpcserve.m.a"}}}
    bound = build_app(args)._bound_deployment
    assert bound.name == "Ingress" and bound.init_args[1] == {}
    assert bound.init_args[4] == {"a": ("engine-a", "hpcserve.m.a")}
    # not split (no `hpcserve up`): the router serves it, with its own failover
    assert _deployments({"models": [{"name": "a", "failover": True}]}) == ("Ingress", ["engine-a"])


def test_a_models_own_app_is_its_engine_replica_answering_http():
    from serve_app.app import build_model_app
    from serve_app.config import AppConfig
    from serve_app.layout import LAYOUT_ARG
    args = {"ingress": "direct", "api_keys": ["k"], "models": [{"name": "a"}, {"name": "b"}],
            "access": {"store": "/tmp/x.db"},
            LAYOUT_ARG: {"model": "b", "router_app": "hpcserve"}}
    bound = build_model_app(args)._bound_deployment
    assert bound.name == "engine-b"
    config = AppConfig.model_validate(bound.init_args[0])
    assert [m.name for m in config.models] == ["b"] and config.api_keys == ["k"]
    assert bound.init_args[1:] == (None, None, "hpcserve")  # the router app's ledger


@pytest.mark.parametrize("models, ingress, mode, own", [
    ([{"name": "a"}], "auto", "direct", []),                       # one model: no router at all
    # failover: an app of its own, even alone, behind the failover relay
    ([{"name": "a", "failover": True}], "auto", "direct", ["a"]),
    ([{"name": "a"}, {"name": "b"}], "auto", "direct", ["a", "b"]),
    ([{"name": "a"}, {"name": "b", "failover": True}], "auto", "direct", ["a", "b"]),
    ([{"name": "a", "failover": True}, {"name": "b", "failover": True}], "auto", "direct",
     ["a", "b"]),
    ([{"name": "a", "failover": True}, {"name": "c", "autoscaling": {"min_replicas": 0}}],
     "auto", "direct", ["a"]),
    ([{"name": "a"}, {"name": "c", "autoscaling": {"min_replicas": 0}}], "auto", "direct", ["a"]),
    ([{"name": "c", "autoscaling": {"min_replicas": 0}}], "auto", "routed", []),
    ([{"name": "a"}, {"name": "b"}], "routed", "routed", []),
])
def test_auto_gives_every_model_that_can_have_it_an_app_of_its_own(models, ingress, mode, own):
    config = parse_app_config({"models": models, "ingress": ingress})
    assert (config.ingress_mode, config.own_app_models) == (mode, own)
    expected = {"a"} if models[0].get("failover") else set()
    expected |= {"b"} if len(models) > 1 and models[1].get("failover") else set()
    assert config.failover_models == (sorted(expected) if mode == "direct" else [])
