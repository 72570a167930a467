"""The edge contract, version 2 (DESIGN.md "Schema negotiation"): what the control plane sends
to each agent, what the agent accepts, and what the edge list says about both.

Control-plane tests run kokoa.make_app under waitress; agent tests run the real agent.sh against
a real nginx and either the real `kokoa.py serve` or a control-plane double fed payloads built
by kokoa.py's own functions.
"""

import json
import re
import subprocess
import urllib.error
import urllib.request

import pytest

import kokoa
from conftest import REPO, KokoaServer, agent_common_jq, make_config, require_tools
from netlab import AGENT, Backend, Edge, make_payload, rehash

TESTDATA = REPO / "testdata"
GOLDEN_SCHEMA1 = TESTDATA / "edge_config_schema1.json"
AGENT_HEADER = {"X-Kokoa-Agent": f"{kokoa.__version__}; schema=1,2"}
PEER = {"public_key": kokoa.b64(kokoa.wg_public_from_private(bytes(range(3, 35)))),
        "allowed_ips": ["10.8.0.9/32"]}


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
    assert payload["schema"] == 2 and payload["access"] == {}
    defaults = {"max_body_size": 0, "buffering": True, "hsts": True, "access": None}
    assert payload["routes"]["a.example.com"] == {"upstream": "10.8.0.2:8080", **defaults}
    assert payload["routes"]["xn--bcher-kva.example.org"] == {
        "upstream": "[fd00:8::3]:3000", **defaults}
    # The same map, with the larger upstream keepalive of schema 2.
    assert payload["nginx_map"] == json.loads(body1)["nginx_map"].replace(
        f"keepalive {kokoa.UPSTREAM_KEEPALIVE[1]};", f"keepalive {kokoa.UPSTREAM_KEEPALIVE[2]};")
    assert "keepalive 128;" in payload["nginx_map"]
    claimed = payload.pop("config_hash")
    assert claimed == kokoa.sha256_hex(kokoa.canonical_json(payload))
    assert headers2["ETag"] == f'"{claimed}"' != headers1["ETag"]
    # Each schema's ETag is its own: schema 1's tag does not match the schema-2 payload.
    status, _, _ = raw_config(api, token, {**AGENT_HEADER, "If-None-Match": headers1["ETag"]})
    assert status == 200
    status, _, body = raw_config(api, token, {**AGENT_HEADER, "If-None-Match": headers2["ETag"]})
    assert status == 304 and body == b""


@pytest.mark.parametrize("header", [
    "0.2.0", "0.2.0; schema=", "0.2.0; schema=4", "0.2.0; schema=0,9", "; schema=2",
    "0.2.0; schema=2; evil=1", "x" * 100 + "; schema=2",
    "0.2.0; schema=" + ",".join(["2"] * 40),
])
def test_a_malformed_or_unknown_agent_header_is_a_400_naming_it(api, header):
    _, token = api.register_edge("edge1")
    status, _, body = raw_config(api, token, {"X-Kokoa-Agent": header})
    assert status == 400
    assert json.loads(body)["error"]["field"] == "X-Kokoa-Agent"


def test_a_route_that_a_schema_cannot_carry_is_left_out_never_served_bare(monkeypatch):
    peers = []
    policy = {"users": [], "allow": ["198.18.0.0/24"], "deny": [], "require": "any",
              "bypass_paths": [], "forward_auth": None, "pass_authorization": False}
    routes = {"open.example.com": {"upstream": "10.8.0.2:80"},
              "locked.example.com": {"upstream": "10.8.0.2:81", "access": policy}}
    payload, unserved = kokoa.edge_payload(routes, peers, False, 1)
    assert payload["hostnames"] == ["open.example.com"]
    assert set(payload["routes"]) == {"open.example.com"}
    assert "locked" not in payload["nginx_map"] and "10.8.0.2:81" not in payload["nginx_map"]
    assert unserved == {"locked.example.com": "needs access, which schema 1 agents cannot "
                                              "enforce: upgrade the edge's agent"}
    # Schema 2 carries it, protected; a schema that could not would leave it out as well.
    payload, unserved = kokoa.edge_payload(routes, peers, False, 2)
    assert unserved == {} and payload["routes"]["locked.example.com"]["access"] in payload[
        "access"]
    monkeypatch.setitem(kokoa.SCHEMA_ROUTE_KEYS, 2, kokoa.SCHEMA_ROUTE_KEYS[1])
    payload, unserved = kokoa.edge_payload(routes, peers, False, 2)
    assert payload["hostnames"] == ["open.example.com"] and payload["access"] == {}
    assert "schema 2 agents" in unserved["locked.example.com"]
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
    monkeypatch.setitem(kokoa.SCHEMA_ROUTE_KEYS, 1, frozenset())
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
    ({"ok": True, "schema": 4}, "schema"),
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
    desired_state = re.compile(r"/api/v1/(origins|routes|settings|access-policies)(/<id>)?")
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


# The agent ##################################################################################

@pytest.fixture
def backend(backend_net):
    item = Backend("alpha", backend_net)
    yield item
    item.close()


def serving(edge, backend):
    """Apply a schema-2 payload routing a.example.com to `backend`; return its payload."""
    edge.double.payload = make_payload({"a.example.com": backend.addr}, schema=2, peers=[PEER])
    edge.once()
    assert edge.get("a.example.com", "/x") == (200, "alpha /x")
    return edge.double.payload


@pytest.fixture
def live_edge(edge, double, backend):
    """An edge serving a.example.com from `backend` (a good schema-2 payload applied)."""
    edge.double = double
    serving(edge, backend)
    return edge


def assert_refused_and_still_serving(edge, double, fragment, **agent_env):
    """Run the agent on the double's payload: it must refuse it whole, keep every file and
    the site, and report the reason."""
    before = edge.snapshot()
    reports = len(double.reports)
    proc = edge.once(rc=1, env=agent_env)
    assert fragment in proc.stderr, proc.stderr
    assert edge.snapshot() == before
    assert edge.get("a.example.com", "/y") == (200, "alpha /y")
    assert edge.stray_files() == []
    report = double.reports[-1]
    assert len(double.reports) > reports and report["ok"] is False
    assert fragment in report["error"]


def test_the_agent_names_its_version_and_schemas_on_every_request(live_edge, double):
    agent_version = re.search(r"^VERSION=(\S+)$", AGENT.read_text(), re.M).group(1)
    assert agent_version == kokoa.__version__
    expected = f"{agent_version}; schema=1,2,3"
    assert {h.get("X-Kokoa-Agent") for h in double.config_requests} == {expected}
    assert {h.get("X-Kokoa-Agent") for h in double.status_requests} == {expected}
    report = double.reports[-1]
    assert report["agent_version"] == agent_version and report["schema"] == 2
    assert report["ok"] is True


def test_an_agent_limited_to_schema_1_applies_the_0_1_0_payload(edge, double):
    double.payload = GOLDEN_SCHEMA1.read_bytes()
    edge.once(env={"AGENT_SCHEMAS": "1"})
    golden = json.loads(GOLDEN_SCHEMA1.read_bytes())
    assert edge.server_files() == [f"{h}.conf" for h in golden["hostnames"]]
    assert (edge.config_dir / "map.conf").read_text() == golden["nginx_map"]
    assert double.config_requests[-1]["X-Kokoa-Agent"] == f"{kokoa.__version__}; schema=1"
    report = double.reports[-1]
    assert report["applied_hash"] == golden["config_hash"] and report["schema"] == 1


@pytest.mark.parametrize("case, change, fragment", [
    ("top-level key", lambda p: p.update(spare=1), "unknown key 'spare' in the payload"),
    ("route key", lambda p: p["routes"]["a.example.com"].update(auth="basic"),
     "unknown key 'auth' in the route for a.example.com"),
    ("route's policy missing", lambda p: p["routes"]["a.example.com"].update(
        access="0123456789abcdef"), "names access policy 0123456789abcdef, which the payload"),
    ("acme key", lambda p: p["acme"].update(dns=True), "unknown key 'dns' in acme"),
    ("wireguard key", lambda p: p["wireguard"].update(mtu=1280),
     "unknown key 'mtu' in wireguard"),
    ("peer key", lambda p: p["wireguard"]["peers"][0].update(psk="x"),
     "unknown key 'psk' in a WireGuard peer"),
    ("missing key", lambda p: p.pop("acme"), "the payload lacks acme"),
    ("future schema", lambda p: p.update(schema=4), "payload schema 4 is not one this agent"),
    ("schema as text", lambda p: p.update(schema="2"), "is not one this agent knows"),
    ("schema 1 spelt out", lambda p: [p.update(schema=1), p.pop("access")],
     "unknown key 'schema'"),
    ("schema-1 route in schema 2", lambda p: p["routes"].update({"a.example.com": "1.2.3.4:80"}),
     "route for a.example.com is not an object"),
])
def test_a_payload_with_a_schema_or_key_the_agent_does_not_know_is_refused_whole(
        live_edge, double, case, change, fragment):
    payload = json.loads(json.dumps(double.payload))
    change(payload)
    double.payload = rehash(payload)
    assert_refused_and_still_serving(live_edge, double, fragment)


def test_an_agent_limited_to_schema_1_refuses_a_schema_2_payload(live_edge, double, backend):
    double.payload = make_payload({"a.example.com": backend.addr, "b.example.com": backend.addr},
                                  schema=2)
    assert_refused_and_still_serving(live_edge, double, "payload schema 2 is not one this agent",
                                     AGENT_SCHEMAS="1")


@pytest.mark.parametrize("upstream", [
    "127.0.0.1:22", "127.9.9.9:80", "0.0.0.0:80", "169.254.169.254:80", "224.0.0.1:80",
    "255.255.255.255:80", "100.100.100.200:80", "168.63.129.16:80", "[::1]:22", "[::]:80",
    "[fe80::1]:80", "[ff02::1]:80", "[fd00:ec2::254]:80", "[::ffff:7f00:1]:80",
])
def test_an_upstream_the_edge_must_never_route_to_is_refused(live_edge, double, upstream):
    routes = {"a.example.com": {"upstream": double.payload["routes"]["a.example.com"]["upstream"]},
              "evil.example.com": {"upstream": upstream}}
    double.payload = kokoa.edge_payload(routes, [], False, 2)[0]
    assert_refused_and_still_serving(live_edge, double, "the route for evil.example.com")


@pytest.mark.parametrize("allowed_ip", ["127.0.0.1/32", "169.254.169.254/32", "::1/128"])
def test_a_wireguard_peer_the_edge_must_never_route_to_is_refused(live_edge, double, allowed_ip):
    payload = json.loads(json.dumps(double.payload))
    payload["wireguard"]["peers"][0]["allowed_ips"] = [allowed_ip]
    double.payload = rehash(payload)
    assert_refused_and_still_serving(live_edge, double, "WireGuard peer address")


def test_with_wg_network_known_nothing_outside_it_is_routed(live_edge, double, backend):
    network = backend.addr.rsplit(".", 1)[0] + ".0/24"     # the backends' own /24
    for routes, peers in (({"b.example.com": "10.9.0.1:80"}, []),
                          ({}, [dict(PEER, allowed_ips=["10.9.0.2/32"])])):
        double.payload = make_payload({"a.example.com": backend.addr, **routes}, schema=2,
                                      peers=peers)
        assert_refused_and_still_serving(live_edge, double, "lies outside the tunnel network",
                                         WG_NETWORK=network)
    double.payload = make_payload({"a.example.com": backend.addr, "b.example.com": backend.addr},
                                  schema=2)
    live_edge.once(env={"WG_NETWORK": network})
    assert live_edge.get("b.example.com", "/z") == (200, "alpha /z")
    proc = live_edge.agent("once", env={"WG_NETWORK": "10.8.0.0/33"})
    assert proc.returncode == 2 and "WG_NETWORK must be a CIDR" in proc.stderr


def test_a_payload_over_the_size_cap_is_refused_even_without_content_length(live_edge, double):
    cap = int(re.search(r"^MAX_PAYLOAD_BYTES=(\d+)", AGENT.read_text(), re.M).group(1))
    double.stream_bytes = cap + 1024 * 1024
    before = live_edge.snapshot()
    proc = live_edge.once(rc=1)
    assert f"over {cap} bytes" in proc.stderr
    assert live_edge.snapshot() == before and live_edge.stray_files() == []
    assert live_edge.get("a.example.com", "/y") == (200, "alpha /y")
    leftovers = [p for p in live_edge.state_dir.rglob("*") if p.is_file()
                 and p.stat().st_size > 10 * 1024 * 1024]
    assert leftovers == []


def test_a_payload_with_more_hostnames_than_the_cap_is_refused(live_edge, double):
    cap = int(re.search(r"^MAX_HOSTNAMES=(\d+)", AGENT.read_text(), re.M).group(1))
    payload = json.loads(json.dumps(double.payload))
    payload["hostnames"] = [f"h{i}.example.com" for i in range(cap + 1)]
    double.payload = rehash(payload)
    assert_refused_and_still_serving(live_edge, double, f"more than this agent takes ({cap})")


def test_every_file_the_agent_writes_is_one_it_owns_and_the_list_is_written_once(edge, double,
                                                                                 backend):
    text = AGENT.read_text()
    owned = re.search(r"^RE_OWNED='(.+)'$", text, re.M).group(1)
    assert text.count("(map|default|policies|servers/") == 1    # one definition, used everywhere
    assert re.search(r"^OWNED_SUBDIRS=\((.+)\)$", text, re.M).group(1) == "servers htpasswd"
    double.payload = make_payload({"a.example.com": backend.addr, "b.example.com": backend.addr})
    edge.once(env={"EDGE_FQDN": "edge1.example.net"})
    written = [str(p.relative_to(edge.config_dir)) for p in edge.config_dir.rglob("*")
               if p.is_file()]
    assert sorted(written) == ["default.conf", "map.conf", "servers/a.example.com.conf",
                               "servers/b.example.com.conf", "servers/edge1.example.net.conf"]
    assert all(re.fullmatch(owned.strip("^$"), rel) for rel in written)


def test_every_system_change_goes_through_the_logged_cmd_helper():
    invocations = re.compile(r'"\$NGINX_BIN" -s reload|\bwg syncconf\b|\bwg-quick up\b'
                             r'|\bip route (replace|del)\b|"\$CERTBOT_BIN"')
    found = [line for line in AGENT.read_text().splitlines()
             if invocations.search(line) and not line.lstrip().startswith("#")
             and not re.match(r"\s*(log|warn|wg_error|ERROR=)", line.lstrip())]
    assert len(found) >= 5
    assert all(re.search(r"\bcmd\b", line) for line in found), found


# The real control plane and the real agent ###################################################

def test_the_real_agent_and_control_plane_negotiate_and_the_edge_list_tells(workdir,
                                                                             backend_net):
    require_tools("nginx", "curl", "jq", "flock", "openssl")
    backend = Backend("alpha", backend_net)
    (workdir / "kokoa").mkdir()
    server = KokoaServer(workdir / "kokoa").start()
    edge = None
    try:
        origin = server.request("POST", "/api/v1/origins", {
            "name": "home", "wg_ip": backend_net.address})[2]
        port = int(backend.addr.rsplit(":", 1)[1])
        assert server.request("POST", "/api/v1/routes", {
            "hostname": "a.example.com", "origin_id": origin["id"], "target_port": port})[0] == 201
        edge_id, token = server.register_edge("edge1")
        edge = Edge(workdir / "edge", server.url, token=token)
        edge.root.chmod(0o755)
        edge.nginx.start()
        for schemas, schema in (("1,2", 2), ("1", 1), ("2", 2)):
            edge.once(env={"AGENT_SCHEMAS": schemas})
            assert edge.get("a.example.com", "/n") == (200, "alpha /n")
            listing = server.request("GET", "/api/v1/edge-nodes")[2]
            node = next(n for n in listing["edge_nodes"] if n["id"] == edge_id)
            assert node["schema"] == schema and node["agent_version"] == kokoa.__version__
            assert node["in_sync"] is True and node["agent_outdated"] is False
            assert node["config_hash"] == listing["config_hashes"][str(schema)]
            assert node["unserved_routes"] == []
    finally:
        if edge is not None:
            edge.nginx.stop()
        server.stop()
        backend.close()


NEVER = "never"       # loopback, link-local, multicast, unspecified or a metadata address
OUTSIDE = "outside"   # outside WG_NETWORK


@pytest.mark.parametrize("address, network, verdict", [
    ("10.8.0.2", "", "ok"), ("10.8.0.2", "10.8.0.0/24", "ok"), ("10.8.1.2", "10.8.0.0/24", OUTSIDE),
    ("10.255.255.255", "10.0.0.0/8", "ok"), ("11.0.0.0", "10.0.0.0/8", OUTSIDE),
    ("10.8.0.2", "0.0.0.0/0", "ok"), ("10.8.0.2", "fd00::/8", OUTSIDE),
    ("127.0.0.1", "", NEVER), ("127.255.255.254", "", NEVER), ("0.0.0.0", "", NEVER),
    ("0.1.2.3", "", NEVER), ("169.254.169.254", "", NEVER), ("169.254.0.1", "10.0.0.0/8", NEVER),
    ("224.0.0.1", "", NEVER), ("239.255.255.255", "", NEVER), ("240.0.0.1", "", NEVER),
    ("255.255.255.255", "", NEVER), ("100.100.100.200", "", NEVER), ("168.63.129.16", "", NEVER),
    ("100.100.100.201", "", "ok"), ("223.255.255.255", "", "ok"), ("100.64.0.1", "", "ok"),
    ("fd00:8::3", "fd00:8::/64", "ok"), ("fd00:8::ffff:1", "fd00:8::/64", "ok"),
    ("fd00:9::3", "fd00:8::/64", OUTSIDE), ("fd00:8::3", "10.8.0.0/24", OUTSIDE),
    ("::1", "", NEVER), ("::", "", NEVER), ("fe80::1", "", NEVER), ("febf::1", "", NEVER),
    ("fec0::1", "", "ok"), ("ff02::1", "", NEVER), ("fd00:ec2::254", "", NEVER),
    ("::ffff:7f00:1", "", NEVER), ("2001:db8::1", "", "ok"),
    ("1:2:3:4:5:6:7:8", "", "ok"), ("1::2::3", "", "bad"), ("12345::1", "", "bad"),
    ("1:2:3:4:5:6:7:8:9", "", "bad"), ("10.8.0.256", "", "bad"), ("10.8.0", "", "bad"),
    ("010.8.0.2", "", "bad"), ("FD00::1", "", "bad"), ("::ffff:10.8.0.2", "", "bad"),
])
def test_the_agents_address_rules(address, network, verdict):
    require_tools("jq")
    program = agent_common_jq() + ' $a | address_problem(address_guard($w)) // "ok"'
    result = subprocess.run(["jq", "-n", "-r", "--arg", "a", address, "--arg", "w", network,
                             program], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    answer = result.stdout.strip()
    expected = {"ok": "ok", NEVER: "is loopback, link-local", OUTSIDE: "outside the tunnel",
                "bad": "is not an IP address"}[verdict]
    assert expected in answer, answer


# Route options (schema 2) ####################################################################

@pytest.mark.parametrize("field, value", [
    ("max_body_size", -1), ("max_body_size", 1.5), ("max_body_size", "5"),
    ("max_body_size", True), ("max_body_size", kokoa.MAX_BODY_SIZE_MIB + 1),
    ("buffering", "no"), ("buffering", 0), ("hsts", None), ("hsts", 1), ("enabled", "true"),
])
def test_a_bad_route_option_is_a_400_naming_it_and_writes_nothing(api, field, value):
    origin = api.create_origin()
    status, _, body = api.request("POST", "/api/v1/routes", {
        "hostname": "a.example.com", "origin_id": origin["id"], "target_port": 80,
        field: value})
    assert status == 400 and body["error"]["field"] == field, body
    assert api.rows("SELECT * FROM routes") == []
    route = api.create_route("b.example.com", origin["id"])
    status, _, body = api.request("PATCH", f"/api/v1/routes/{route['id']}", {field: value})
    assert status == 400 and body["error"]["field"] == field
    assert api.request("GET", f"/api/v1/routes/{route['id']}")[2] == route


def test_route_options_reach_schema_2_and_a_disabled_route_no_edge(api):
    origin = api.create_origin()
    route = api.create_route("sse.example.com", origin["id"])
    assert {k: route[k] for k in kokoa.ROUTE_OPTIONS} == kokoa.ROUTE_OPTIONS
    status, _, patched = api.request("PATCH", f"/api/v1/routes/{route['id']}", {
        "buffering": False, "max_body_size": 5})
    assert status == 200 and patched["buffering"] is False and patched["max_body_size"] == 5
    assert patched["hsts"] is True and patched["enabled"] is True      # others kept
    off = api.create_route("off.example.com", origin["id"])
    assert api.request("PATCH", f"/api/v1/routes/{off['id']}", {"enabled": False})[0] == 200
    _, token = api.register_edge("edge1")
    v2 = json.loads(raw_config(api, token, AGENT_HEADER)[2])
    assert v2["routes"] == {"sse.example.com": {
        "upstream": "10.8.0.2:8080", "max_body_size": 5, "buffering": False, "hsts": True,
        "access": None}}
    # schema 1 cannot say "stream" or "5 MiB": its agents serve the route as 0.1.0 did
    v1 = json.loads(raw_config(api, token)[2])
    assert v1["routes"] == {"sse.example.com": "10.8.0.2:8080"}
    assert v1["hostnames"] == v2["hostnames"] == ["sse.example.com"]
    assert "off.example.com" not in v1["nginx_map"] + v2["nginx_map"]
    assert edge_list(api)["edge1"]["unserved_routes"] == []
    assert api.request("PATCH", f"/api/v1/routes/{off['id']}", {"enabled": True})[0] == 200
    assert "off.example.com" in json.loads(raw_config(api, token, AGENT_HEADER)[2])["hostnames"]
