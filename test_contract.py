"""The edge contract, version 2 (DESIGN.md "Schema negotiation"): what the control plane sends
to each agent, what the agent accepts, and what the edge list says about both.

Control-plane tests run kokoa.make_app under waitress; agent tests run the real agent.sh against
a real nginx and either the real `kokoa.py serve` or a control-plane double fed payloads built
by kokoa.py's own functions.
"""

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

import kokoa
from conftest import REPO, InProcessServer, make_config, require_tools

TESTDATA = REPO / "testdata"
GOLDEN_SCHEMA1 = TESTDATA / "edge_config_schema1.json"
AGENT_HEADER = {"X-Kokoa-Agent": f"{kokoa.__version__}; schema=1,2"}


@pytest.fixture
def api(tmp_path):
    server = InProcessServer(make_config(tmp_path / "kokoa.db"))
    yield server
    server.close()


def build_golden_state(server):
    """The desired state from which testdata/edge_config_schema1.json was made by kokoa 0.1.0
    (the same calls, in the same order)."""
    pub_a = kokoa.b64(kokoa.wg_public_from_private(bytes(range(1, 33))))
    pub_b = kokoa.b64(kokoa.wg_public_from_private(bytes(range(2, 34))))
    a = server.request("POST", "/api/v1/origins", {
        "name": "home", "wg_ip": "10.8.0.2", "wg_public_key": pub_a,
        "wg_endpoint": "home.example.net:51820"})[2]
    b = server.request("POST", "/api/v1/origins", {
        "name": "office", "wg_ip": "fd00:8::3", "wg_public_key": pub_b})[2]
    for host, origin, port in (("b.example.com", a, 8080), ("a.example.com", a, 8080),
                               ("Bücher.Example.ORG.", b, 3000), ("x.y.example.net", b, 443)):
        status, _, body = server.request("POST", "/api/v1/routes", {
            "hostname": host, "origin_id": origin["id"], "target_port": port})
        assert status == 201, body
    assert server.request("PATCH", "/api/v1/settings", {"acme_staging": True})[0] == 200


def raw_config(server, token, headers=None):
    """GET /me/config; (status, headers, raw body bytes)."""
    req = urllib.request.Request(server.url + "/api/v1/edge-nodes/me/config",
                                 headers={"Authorization": f"Bearer {token}", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def edge_list(server):
    status, _, body = server.request("GET", "/api/v1/edge-nodes")
    assert status == 200, body
    return {edge["name"]: edge for edge in body["edge_nodes"]}


# Control plane: negotiation ##################################################################

def test_an_agent_without_the_header_gets_the_0_1_0_payload_byte_for_byte(api):
    build_golden_state(api)
    _, token = api.register_edge("edge1")
    status, headers, body = raw_config(api, token)
    assert status == 200
    assert body == GOLDEN_SCHEMA1.read_bytes()
    assert "schema" not in json.loads(body)
    assert headers["ETag"] == f'"{json.loads(body)["config_hash"]}"'
    # An agent that says it knows schema 1 only gets the same bytes.
    assert raw_config(api, token, {"X-Kokoa-Agent": "0.2.0; schema=1"})[2] == body


def test_the_highest_common_schema_is_sent_with_its_own_etag(api):
    build_golden_state(api)
    _, token = api.register_edge("edge1")
    _, headers1, body1 = raw_config(api, token)
    status, headers2, body2 = raw_config(api, token, {"X-Kokoa-Agent": "0.2.0; schema=2, 1"})
    assert status == 200
    payload = json.loads(body2)
    assert payload["schema"] == 2
    assert payload["routes"]["a.example.com"] == {"upstream": "10.8.0.2:8080"}
    assert payload["routes"]["xn--bcher-kva.example.org"] == {"upstream": "[fd00:8::3]:3000"}
    assert payload["nginx_map"] == json.loads(body1)["nginx_map"]
    claimed = payload.pop("config_hash")
    assert claimed == kokoa.sha256_hex(kokoa.canonical_json(payload))
    assert headers2["ETag"] == f'"{claimed}"' != headers1["ETag"]
    # Each schema's ETag is its own: schema 1's tag does not match the schema-2 payload.
    status, _, _ = raw_config(api, token, {**AGENT_HEADER, "If-None-Match": headers1["ETag"]})
    assert status == 200
    status, _, body = raw_config(api, token, {**AGENT_HEADER, "If-None-Match": headers2["ETag"]})
    assert status == 304 and body == b""


@pytest.mark.parametrize("header", [
    "0.2.0", "0.2.0; schema=", "0.2.0; schema=3", "0.2.0; schema=0,9", "; schema=2",
    "0.2.0; schema=2; evil=1", "x" * 100 + "; schema=2",
    "0.2.0; schema=" + ",".join(["2"] * 40),
])
def test_a_malformed_or_unknown_agent_header_is_a_400_naming_it(api, header):
    _, token = api.register_edge("edge1")
    status, _, body = raw_config(api, token, {"X-Kokoa-Agent": header})
    assert status == 400
    assert json.loads(body)["error"]["field"] == "X-Kokoa-Agent"


def test_a_route_that_a_schema_cannot_carry_is_left_out_never_served_bare():
    peers = []
    routes = {"open.example.com": {"upstream": "10.8.0.2:80"},
              "locked.example.com": {"upstream": "10.8.0.2:81", "access": "0123456789abcdef"}}
    for schema in kokoa.SCHEMAS:
        payload, unserved = kokoa.edge_payload(routes, peers, False, schema)
        assert payload["hostnames"] == ["open.example.com"]
        assert set(payload["routes"]) == {"open.example.com"}
        assert "locked" not in payload["nginx_map"] and "10.8.0.2:81" not in payload["nginx_map"]
        assert set(unserved) == {"locked.example.com"}
        assert "access" in unserved["locked.example.com"]
    # An unset protection (null) is nothing to enforce: the route is served.
    routes["locked.example.com"]["access"] = None
    payload, unserved = kokoa.edge_payload(routes, peers, False, 1)
    assert unserved == {} and len(payload["hostnames"]) == 2


def test_the_payload_is_a_pure_function_of_state_and_schema():
    routes = {f"h{i}.example.com": {"upstream": f"10.8.0.{i % 7 + 2}:80"} for i in range(40)}
    shuffled = dict(sorted(routes.items(), reverse=True))
    for schema in kokoa.SCHEMAS:
        first = kokoa.canonical_json(kokoa.edge_payload(routes, [], True, schema)[0])
        assert first == kokoa.canonical_json(kokoa.edge_payload(shuffled, [], True, schema)[0])
    with pytest.raises(ValueError):
        kokoa.edge_payload(routes, [], True, 99)


def test_the_edge_list_shows_agent_schema_and_what_it_cannot_serve(api, monkeypatch):
    build_golden_state(api)
    _, old_token = api.register_edge("old")
    _, new_token = api.register_edge("new")
    _, never = api.register_edge("never")
    assert raw_config(api, old_token)[0] == 200
    assert raw_config(api, new_token, AGENT_HEADER)[0] == 200
    edges = edge_list(api)
    assert edges["old"]["schema"] == 1 and edges["old"]["agent_version"] is None
    assert edges["old"]["agent_outdated"] is True
    assert edges["new"]["schema"] == 2 and edges["new"]["agent_version"] == kokoa.__version__
    assert edges["new"]["agent_outdated"] is False
    assert edges["never"]["agent_outdated"] is None
    assert all(edge["unserved_routes"] == [] for edge in edges.values())
    # A schema that cannot carry a route: the old edge's list names it, with the reason.
    monkeypatch.setitem(kokoa.SCHEMA_ROUTE_KEYS, 1, ())
    api.app.edge_config.invalidate()
    edges = edge_list(api)
    assert [r["hostname"] for r in edges["old"]["unserved_routes"]] == [
        "a.example.com", "b.example.com", "x.y.example.net", "xn--bcher-kva.example.org"]
    assert "upgrade" in edges["old"]["unserved_routes"][0]["reason"]
    assert edges["new"]["unserved_routes"] == []
    _, _, body = raw_config(api, old_token)
    assert json.loads(body)["hostnames"] == []


def test_in_sync_compares_with_the_payload_of_the_edges_own_schema(api):
    build_golden_state(api)
    _, token = api.register_edge("edge1")
    _, headers, _ = raw_config(api, token, AGENT_HEADER)
    applied = headers["ETag"].strip('"')
    status, _, body = api.request("POST", "/api/v1/edge-nodes/me/status", {
        "applied_hash": applied, "ok": True, "agent_version": "0.2.0", "schema": 2},
        headers=AGENT_HEADER, auth=token)
    assert status == 204, body
    edge = edge_list(api)["edge1"]
    assert edge["in_sync"] is True and edge["config_hash"] == applied


@pytest.mark.parametrize("body, field", [
    ({"ok": True, "agent_version": "0.2.0; rm -rf"}, "agent_version"),
    ({"ok": True, "agent_version": 2}, "agent_version"),
    ({"ok": True, "agent_version": ""}, "agent_version"),
    ({"ok": True, "schema": 3}, "schema"),
    ({"ok": True, "schema": True}, "schema"),
    ({"ok": True, "schema": "2"}, "schema"),
])
def test_a_bad_agent_version_or_schema_in_a_status_is_a_400(api, body, field):
    _, token = api.register_edge("edge1")
    before = api.snapshot()
    status, _, error = api.request("POST", "/api/v1/edge-nodes/me/status", body, auth=token)
    assert status == 400 and error["error"]["field"] == field
    assert api.snapshot() == before


# Control plane: code that keeps the contract honest ##########################################

def test_make_app_only_wires_it_touches_no_database(tmp_path):
    config = make_config(tmp_path / "nothing-here.db")
    kokoa.make_app(config)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_auth_kind_is_refused_when_the_route_is_declared():
    with pytest.raises(ValueError, match="unknown auth kind"):
        kokoa.route("GET", "/api/v1/typo", auth="admim")
    assert all(entry.auth in kokoa.AUTH_KINDS for entry in kokoa.ROUTES)


def test_every_write_to_the_desired_state_declares_that_it_changes_the_edge_config():
    desired_state = re.compile(r"/api/v1/(origins|routes|settings)(/<id>)?")
    for entry in kokoa.ROUTES:
        if entry.method in ("POST", "PATCH", "PUT", "DELETE"):
            assert entry.changes_config == bool(desired_state.fullmatch(entry.pattern)), entry


def test_a_write_changes_every_schemas_payload_at_once(api):
    build_golden_state(api)
    _, token = api.register_edge("edge1")
    tags = [raw_config(api, token, h)[1]["ETag"] for h in ({}, AGENT_HEADER)]
    api.request("PATCH", "/api/v1/settings", {"acme_staging": False})
    for tag, headers in zip(tags, ({}, AGENT_HEADER), strict=True):
        assert raw_config(api, token, {**headers, "If-None-Match": tag})[0] == 200
