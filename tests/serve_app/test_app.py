"""``build_app``: which deployments each ingress mode makes, before anything runs.

That the modes serve alike over HTTP is ``test_ingress.py``'s job (it runs both);
this checks what ``auto``, the default, picks.
"""

from serve_app.app import build_app


def _deployments(args: dict) -> tuple[str, list[str]]:
    """The app's ingress deployment and the engine deployments it routes to."""
    bound = build_app(args)._bound_deployment
    routed_to = bound.init_args[1] if bound.name == "Ingress" else {}
    return bound.name, sorted(app._bound_deployment.name for app in routed_to.values())


def test_auto_serves_one_model_directly_from_its_engine_replicas():
    assert _deployments({"models": [{"name": "a"}]}) == ("engine-a", [])


def test_auto_routes_several_models_through_the_ingress():
    assert _deployments({"models": [{"name": "a"}, {"name": "b"}]}) == (
        "Ingress", ["engine-a", "engine-b"])


def test_routed_can_be_asked_for_with_one_model():
    assert _deployments({"ingress": "routed", "models": [{"name": "a"}]}) == (
        "Ingress", ["engine-a"])
