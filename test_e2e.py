"""The whole system end to end, in network namespaces this test creates.

control plane (this namespace, loopback) -- forwarded into --> edge namespace: nginx, agent.sh,
pebble (the ACME CA), wireguard-go; origin-a (reachable, has an endpoint) and origin-b (behind
a NAT-like firewall: only it can dial out) over WireGuard; a client namespace does the requests.
Underlay 198.18.0.0/24 on a bridge; overlay 10.8.0.0/24 inside the tunnels. Nothing else is
touched; every process and namespace goes away at the end, also on failure.
"""


import pytest

from conftest import require_root, require_tools
from netlab import TOOLS, built_world


@pytest.fixture
def world():
    require_root()
    require_tools(*TOOLS)
    with built_world("kokoa-e2e-") as world:
        yield world


def test_a_request_crosses_edge_and_tunnel_to_reachable_and_natted_origins(world):
    app = world.route("app.example.test", world.origin_a, 8080)
    home = world.route("home.example.test", world.origin_b, 8081)
    first = world.agent_once()
    assert "certificate for app.example.test obtained" in first.stdout, first.stdout
    assert "certificate for home.example.test obtained" in first.stdout, first.stdout
    peers = world.lab.run("edge", "wg", "show", world.edge_if, "allowed-ips").stdout
    assert "10.8.0.2/32" in peers and "10.8.0.3/32" in peers

    world.client_until("app.example.test", "hello from origin A")
    world.client_until("home.example.test", "hello from origin B behind NAT",
                       kick=world.kick_origin_b)
    unreachable = world.lab.run("edge", "curl", "-s", "--max-time", "2",
                                f"http://{world.lab.address('origin-b')}:8081/", check=False)
    assert unreachable.returncode == 28          # dropped, not refused: only B can dial out
    code, _ = world.client("app.example.test", scheme="http")
    assert code == 301                   # certified hosts redirect port 80 to 443
    _, _, edges = world.kokoa.request("GET", "/api/v1/edge-nodes")
    [edge] = edges["edge_nodes"]
    assert edge["in_sync"] is True and edge["last_error"] is None
    assert edge["certificates"]["app.example.test"]["status"] == "valid"

    # The route's port changes: the next run serves the new port.
    status, _, _ = world.kokoa.request("PATCH", f"/api/v1/routes/{app['id']}",
                                       {"target_port": 8082})
    assert status == 200
    world.agent_once()
    assert world.client("app.example.test") == (200, "origin A on port 8082")

    # The route goes away: that host is refused, the other keeps working.
    assert world.kokoa.request("DELETE", f"/api/v1/routes/{home['id']}")[0] == 204
    world.agent_once()
    code, _ = world.client("home.example.test", scheme="http")
    assert code in (404, 421)
    assert world.client("app.example.test") == (200, "origin A on port 8082")

    # The control plane goes down: the site still answers; the agent says why it failed.
    world.kokoa.stop()
    down = world.agent_once(rc=1)
    assert "cannot reach the control plane" in down.stderr
    assert world.client("app.example.test") == (200, "origin A on port 8082")

    # It comes back and revokes the edge: the next poll fails clearly, the site still answers.
    world.kokoa.start()
    assert world.kokoa.request("DELETE", f"/api/v1/edge-nodes/{world.edge_id}")[0] == 204
    revoked = world.agent_once(rc=1)
    assert "rejected this edge's token" in revoked.stderr
    assert world.client("app.example.test") == (200, "origin A on port 8082")


def test_origin_peers_follow_edges_and_unchanged_tunnels_stay_up(world):
    world.route("app.example.test", world.origin_a, 8080)
    world.agent_once()
    world.client_until("app.example.test", "hello from origin A")
    before = world.lab.run("edge", "wg", "show", world.edge_if, "latest-handshakes").stdout
    # A new origin appears: the edge gains a peer without dropping the existing tunnel.
    status, _, _ = world.kokoa.request("POST", "/api/v1/origins",
                                       {"name": "origin-c", "wg_ip": "10.8.0.4"})
    assert status == 201
    world.agent_once()
    after = world.lab.run("edge", "wg", "show", world.edge_if, "latest-handshakes").stdout
    key_a = world.origin_a["wg_public_key"]
    assert _handshake(before, key_a) == _handshake(after, key_a) != "0"
    assert "10.8.0.4/32" in world.lab.run("edge", "wg", "show", world.edge_if,
                                          "allowed-ips").stdout
    assert world.client("app.example.test") == (200, "hello from origin A")
    # The origin's wireguard.conf names this edge as its peer, with keepalive for NAT.
    conf = world.kokoa.request(
        "GET", f"/api/v1/origins/{world.origin_b['id']}/wireguard.conf")[2].decode()
    assert f"Endpoint = {world.lab.address('edge')}:51820" in conf
    assert "PersistentKeepalive = 25" in conf


def _handshake(show_output, key):
    for line in show_output.splitlines():
        peer, _, stamp = line.partition("\t")
        if peer == key:
            return stamp
    return None
