"""Routing by model on a real HAProxy (the binary Ray Serve runs), with the backends
and ACLs Serve writes for one application per model and a router at ``/``."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from cluster.model_routes import frontend_rules, route_prefix, write_map
from cluster.ports import free_ports
from tests.haproxy_support import HTTP_DEFAULTS, SERVE_HEAD, check_config, start

MODELS = ["tiny", "org/Model-7B"]

CONFIG = """global
    tune.bufsize 16384
""" + HTTP_DEFAULTS + """frontend http_frontend
    bind 127.0.0.1:{port}
{rules}{acls}    use_backend router if {{ path_beg / }}
backend router
    http-request return status 200 content-type text/plain lf-string "router %[path]"
{backends}"""


def _backend(name: str, prefix: str) -> tuple[str, str]:
    acl = (f"    acl is_{name} path_beg {prefix}/\n    acl is_{name} path {prefix}\n"
           f"    use_backend {name} if is_{name}\n")
    backend = (f"backend {name}\n    http-request return status 200 content-type text/plain "
               f"lf-string \"{name} %[path]\"\n")
    return acl, backend


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory):
    d = tmp_path_factory.mktemp("model-routes")
    write_map(d, MODELS)
    parts = [_backend(f"m{i}", route_prefix(m)) for i, m in enumerate(MODELS)]
    port = free_ports(1)[0]
    config = d / "haproxy.cfg"
    config.write_text(CONFIG.format(port=port, rules=frontend_rules(d),
                                    acls="".join(a for a, _ in parts),
                                    backends="".join(b for _, b in parts)))
    check_config(config)
    proc = start(config, port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def post(url: str, path: str, body: bytes | dict) -> str:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, timeout=10,
                      headers={"Content-Type": "application/json"}).text


def test_a_request_goes_to_its_models_application_with_the_path_it_asked_for(haproxy):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    assert post(haproxy, "/v1/chat/completions", chat) == "m0 /_m/tiny/v1/chat/completions"
    assert post(haproxy, "/v1/completions", {"prompt": "x", "model": "org/Model-7B"}) == \
        "m1 /_m/org_2fModel-7B/v1/completions"
    assert post(haproxy, "/v1/embeddings", {"model": "tiny", "input": "x"}) == \
        "m0 /_m/tiny/v1/embeddings"


def test_everything_else_reaches_the_router_unchanged(haproxy):
    assert post(haproxy, "/v1/chat/completions", {"model": "tribunal"}) == \
        "router /v1/chat/completions"                       # no app of its own
    assert post(haproxy, "/v1/chat/completions", b"{not json") == "router /v1/chat/completions"
    assert post(haproxy, "/v1/chat/completions", {"messages": []}) == \
        "router /v1/chat/completions"                       # no model: the router's 400
    assert post(haproxy, "/v1/files", {"model": "tiny"}) == "router /v1/files"
    assert httpx.get(haproxy + "/v1/models").text == "router /v1/models"
    # a client that calls a model's route itself is not prefixed twice
    assert post(haproxy, "/_m/tiny/v1/completions", {"model": "tiny"}) == \
        "m0 /_m/tiny/v1/completions"


def test_a_body_larger_than_haproxys_buffer_is_routed_by_what_fits(haproxy):
    """json_query reads the part of the body in the buffer (16 KiB here): a model
    named there is found; one named after it is not, and the router serves it."""
    first = {"model": "tiny", "prompt": "x" * 40_000}
    assert post(haproxy, "/v1/completions", first) == "m0 /_m/tiny/v1/completions"
    last = {"prompt": "x" * 40_000, "model": "tiny"}
    assert post(haproxy, "/v1/completions", last) == "router /v1/completions"


def test_route_prefixes_keep_distinct_names_distinct():
    names = ["a/b", "a_2fb", "a b", "a.b", "ä"]
    prefixes = [route_prefix(n) for n in names]
    assert len(set(prefixes)) == len(names)
    assert all(p.startswith("/_m/") and " " not in p and p.count("/") == 2 for p in prefixes)


def test_the_map_is_rewritten_only_when_it_changes(tmp_path: Path):
    path = write_map(tmp_path, ["tiny", "has space"])
    assert path.read_text() == "tiny /_m/tiny\n"  # a name HAProxy's map cannot hold
    mtime = path.stat().st_mtime_ns
    write_map(tmp_path, ["tiny"])
    assert path.stat().st_mtime_ns == mtime


SERVE_LIKE = SERVE_HEAD + """frontend http_frontend
    bind 0.0.0.0:{p3}
    use_backend router if {{ path_beg / }}
backend router
    http-request return status 200 content-type text/plain lf-string "router %[path]"
"""


def test_the_guard_adds_the_rules_after_the_shed_rules_once_a_map_has_models(tmp_path):
    from cluster.haproxy_guard import rewrite, write_error_pages, write_shed_files
    write_error_pages(tmp_path)
    write_shed_files(tmp_path)
    text = SERVE_LIKE.format(d=tmp_path, p1=1, p2=2, p3=3)
    kwargs = dict(http_host="127.0.0.1", serve_bind_host="127.0.0.1", error_dir=tmp_path,
                  shed_dir=tmp_path)
    alone = rewrite(text, **kwargs)  # no map: the path of one model, held whole to be retried
    assert "hpcserve_model" not in alone and alone.count("wait-for-body") == 1
    (tmp_path / "haproxy.cfg").write_text(alone)
    check_config(tmp_path / "haproxy.cfg")
    write_map(tmp_path, ["tiny"])
    new = rewrite(text, **kwargs)
    frontend = new[new.index("frontend http_frontend"):new.index("\nbackend router")]
    lines = frontend.splitlines()
    shed = max(i for i, line in enumerate(lines) if "hpcserve_shed" in line)
    model = min(i for i, line in enumerate(lines) if "hpcserve_model" in line)
    assert lines[1].lstrip().startswith("bind 127.0.0.1:3") and shed < model
    assert new.count("wait-for-body") == 1
    assert lines[-1].lstrip().startswith("use_backend")
    (tmp_path / "haproxy.cfg").write_text(new)
    check_config(tmp_path / "haproxy.cfg")


def test_split_apps_gives_each_always_on_model_an_app_and_keeps_the_router():
    from cluster.model_routes import split_apps
    from serve_app.layout import LAYOUT_ARG
    cold = {"name": "c", "autoscaling": {"min_replicas": 0, "max_replicas": 1}}
    app = {"name": "hpcserve", "route_prefix": "/", "import_path": "serve_app.app:build_app",
           "runtime_env": {"env_vars": {"X": "1"}},
           "args": {"ingress": "direct", "models": [{"name": "a"}, {"name": "org/b", "failover": True},
                                                    cold]}}
    other = {"name": "plain", "route_prefix": "/plain", "import_path": "serve_app.app:build_app",
             "args": {"models": [{"name": "a"}]}}
    serve = {"http_options": {"port": 1}, "applications": [app, other]}
    # no relay (no Ray token to sign with): the failover model stays on the router
    no_relay, routed, failover = split_apps(serve, relay=False)
    assert routed == ["a"] and failover == []
    assert no_relay["applications"][0]["args"][LAYOUT_ARG] == {"model_apps": {"a": "hpcserve.m.a"}}
    split, routed, failover = split_apps(serve)
    assert routed == ["a", "org/b"] and failover == ["org/b"]
    names = [(a["name"], a["route_prefix"], a["import_path"]) for a in split["applications"]]
    assert names == [("hpcserve", "/", "serve_app.app:build_app"),
                     ("hpcserve.m.a", "/_m/a", "serve_app.app:build_model_app"),
                     ("hpcserve.m.org_2fb", "/_m/org_2fb", "serve_app.app:build_model_app"),
                     ("plain", "/plain", "serve_app.app:build_app")]
    by = {a["name"]: a for a in split["applications"]}
    assert by["hpcserve"]["args"][LAYOUT_ARG] == {
        "model_apps": {"a": "hpcserve.m.a", "org/b": "hpcserve.m.org_2fb"}}
    assert by["hpcserve.m.a"]["args"][LAYOUT_ARG] == {"model": "a", "router_app": "hpcserve"}
    assert by["hpcserve.m.a"]["runtime_env"] == app["runtime_env"]
    assert LAYOUT_ARG not in by["plain"]["args"] and "_layout" not in app["args"]  # untouched
    assert split_apps({"applications": [other]}) == ({"applications": [other]}, [], [])


def test_auto_off_the_root_keeps_the_router_where_direct_is_refused(tmp_path):
    """The split needs the app at ``/``: ``auto`` elsewhere serves every model from the
    router (and says so), an explicit ``direct`` is a config error naming the field."""
    import yaml

    from cluster.config import ingress_modes, load_config
    from cluster.model_routes import split_apps
    from serve_app.config import ConfigError
    from serve_app.layout import LAYOUT_ARG
    from tests.conftest import default_config

    two = [{"name": "a"}, {"name": "b"}]
    for ingress in ("auto", "direct"):
        raw = default_config(models=two, args={"ingress": ingress})
        raw["applications"][0]["route_prefix"] = "/x"
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
        if ingress == "direct":
            with pytest.raises(ConfigError, match=r"applications\.0\.route_prefix: 'direct'"):
                load_config(tmp_path / "c.yaml")
            continue
        serve = load_config(tmp_path / "c.yaml").serve
        split, routed, failover = split_apps(serve)
        assert (split, routed, failover) == (serve, [], [])
        assert ingress_modes(serve["applications"]) == {serve["applications"][0]["name"]: "routed"}
    # at the root it splits; the running router's args (with the layout) still say direct
    raw = default_config(models=two)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    split, routed, _ = split_apps(load_config(tmp_path / "c.yaml").serve)
    assert routed == ["a", "b"]
    router = split["applications"][0]
    assert LAYOUT_ARG in router["args"]
    assert ingress_modes(split["applications"]) == {router["name"]: "direct"}
    assert ingress_modes(split["applications"], running=True) == {router["name"]: "direct"}
    # running, not split (an hpcserve whose auto kept several models on the router)
    unsplit = load_config(tmp_path / "c.yaml").serve["applications"]
    assert ingress_modes(unsplit, running=True) == {router["name"]: "routed"}


def test_failover_auto_is_on_only_where_no_pool_shares_the_heads_cores():
    """``failover: auto`` by layout: the local provider's jobs share the head's machine,
    SLURM's and HEAppE's run on compute nodes unless the pool says otherwise; and
    nothing is on without a relay that can sign."""
    from cluster.config import PoolConfig
    from cluster.model_routes import failover_by_default
    local, slurm = PoolConfig(name="l"), PoolConfig(name="s", provider="slurm")
    heappe = PoolConfig(name="h", provider="heappe",
                        provider_options={"base_url": "https://heappe.example", "cluster_id": 1,
                                          "project_id": 1, "command_template_id": 1,
                                          "cluster_node_type_id": 1,
                                          "file_transfer_method_id": 1,
                                          "access_token_env": "HEAPPE_TOKEN"})
    on_head = PoolConfig(name="dev", provider="slurm", shares_head_cores=True)
    off_head = PoolConfig(name="big", provider="local", shares_head_cores=False)
    assert [p.shares_head_cores for p in (local, slurm, heappe, on_head, off_head)] == [
        True, False, False, True, False]
    assert failover_by_default([slurm, heappe], relay=True)
    assert failover_by_default([off_head], relay=True)
    assert not failover_by_default([slurm, heappe], relay=False)
    assert not failover_by_default([local], relay=True)
    assert not failover_by_default([slurm, on_head], relay=True)  # one shared pool is enough


def test_decide_failover_writes_auto_as_the_layouts_answer_and_keeps_explicit_choices():
    from cluster.model_routes import decide_failover, failover_changes, split_apps
    models = [{"name": "a"}, {"name": "b", "failover": False}, {"name": "c", "failover": True},
              {"name": "e", "task": "embed", "engine": "vllm",
               "engine_args": {"model": "/models/minilm"}}, {"name": "d", "failover": "auto"},
              {"name": "cold", "autoscaling": {"min_replicas": 0, "max_replicas": 1}}]
    app = {"name": "hpcserve", "route_prefix": "/", "import_path": "serve_app.app:build_app",
           "args": {"models": models}}
    foreign = {"name": "x", "import_path": "elsewhere:app", "args": {"models": [{"name": "a"}]}}
    serve = {"http_options": {"port": 1}, "applications": [app, foreign]}

    def failover(config):
        return [m["failover"] for m in config["applications"][0]["args"]["models"]]
    on = decide_failover(serve, True)
    # the router serves a model that may go cold (and fails over itself): not the relay
    assert failover(on) == [True, False, True, False, True, False]
    assert on["applications"][1] == foreign and on["http_options"] == serve["http_options"]
    assert models[0] == {"name": "a"}  # the config given is left as it was
    off = decide_failover(serve, False)
    assert failover(off) == [False, False, True, False, False, False]
    # decided, the relay takes exactly the models turned on and those that asked
    assert split_apps(on)[2] == ["a", "c", "d"] and split_apps(off)[2] == ["c"]
    assert failover_changes(split_apps(off)[2], split_apps(on)[2]) == [
        "mid-stream failover on for a, d, through the head's relay"]
    assert failover_changes(["a", "c"], ["c"]) == ["mid-stream failover off for a"]
    # one generation model: auto on gives it an application of its own behind the relay
    one = {"applications": [{**app, "args": {"models": [{"name": "a"}]}}]}
    split, routed, relayed = split_apps(decide_failover(one, True))
    assert routed == relayed == ["a"] and len(split["applications"]) == 2
    assert split_apps(decide_failover(one, False)) == (decide_failover(one, False), [], [])
    # where the relay cannot reach it, auto stays off, so the data path stays as it was:
    # an app not at `/` (not split), or the routed ingress
    from cluster.config import ingress_modes
    for elsewhere, mode in (
            ({**app, "route_prefix": "/api", "args": {"models": [{"name": "a"}]}}, "direct"),
            ({**app, "args": {"ingress": "routed", "models": [{"name": "a"}]}}, "routed")):
        decided = decide_failover({"applications": [elsewhere]}, True)
        assert failover(decided) == [False]
        assert split_apps(decided)[2] == []
        assert ingress_modes(decided["applications"]) == {"hpcserve": mode}


def test_a_failed_deploy_puts_the_maps_back_as_they_were(tmp_path):
    """``hpcserve deploy`` writes the maps before Serve takes the config (so a restarted
    HAProxy routes by them); if Serve refuses it, what runs is the config before."""
    from types import SimpleNamespace

    from cluster.model_routes import relayed_models, restore_maps, saved_maps
    head = SimpleNamespace(env={"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(tmp_path / "x.cfg")})
    write_map(tmp_path, ["a"])
    saved = saved_maps(head)
    before = {path: path.read_text() for path in tmp_path.glob("*.map")}
    write_map(tmp_path, ["a", "b"], failover=["a"])
    assert relayed_models(head) == ["a"]
    restore_maps(saved)
    assert relayed_models(head) == []
    assert {path: path.read_text() for path in tmp_path.glob("*.map")} == before
