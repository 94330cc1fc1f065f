"""Names derived from a model's name, for both planes (``serve_app.layout``)."""

from __future__ import annotations

import pytest

from serve_app.layout import model_name, model_route, safe_name


@pytest.mark.parametrize("name", ["tiny", "org/Model-7B", "a_b", "x_2f", "ü y/z", "q.v1"])
def test_a_route_gives_back_its_models_name(name):
    """The failover relay labels its counters with the model a route is for."""
    assert model_route(name) == "/_m/" + safe_name(name)
    assert set(safe_name(name)) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                       "0123456789.-_")
    assert model_name(safe_name(name)) == name


def test_distinct_names_stay_distinct():
    assert safe_name("a/b") != safe_name("a_2fb") and safe_name("a_b") != safe_name("a b")
