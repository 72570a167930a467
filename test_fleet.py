"""Certificates shared by the fleet, end to end (issue 15): two edges in namespaces, a real
control plane, real certbot and pebble. One hostname's certificate is issued once, by the edge
holding the claim, whichever edge the CA reaches; every edge serves the same certificate; a
holder killed mid-issue hands over when its claim expires; renewal issues once.

pebble runs in the first edge's namespace (netlab.World); the second edge reaches its
directory through a relay on its own loopback. pebble's DNS (pebble-challtestsrv) answers
every name with the first edge (127.0.0.1 there) unless a test points a name elsewhere.
"""

import os
import stat

import pytest

from conftest import kill_session, require_root, require_tools, wait_until
from netlab import TOOLS, Knot, built_world

HOST = "app.example.test"


@pytest.fixture
def world():
    require_root()
    require_tools(*TOOLS)
    with built_world("kokoa-fleet-") as world:
        yield world


def restart_control_plane(world, **env):
    """Restart the control plane with these environment variables (same database)."""
    world.kokoa.stop()
    world.kokoa.env.update(env)
    world.kokoa.start()


def certificate_states(world):
    return {c["name"]: c for c in world.kokoa.request("GET", "/api/v1/certificates")[2][
        "certificates"]}


def test_a_certificate_is_issued_once_and_served_by_every_edge_whichever_edge_the_ca_reaches(
        world):
    world.route(HOST, world.origin_a, 8080)
    edge1, edge2 = world.first_edge(), world.add_edge("edge2")
    # The name's DNS names only edge2; edge1 holds the claim and runs certbot, so the CA asks
    # an edge that never saw the token: it answers from the control plane.
    world.pebble.add_a(HOST, edge2.address)
    edge2.once(env={"EMAIL": ""})              # serves the route, issues nothing
    assert world.issued_orders() == 0
    out = edge1.once()
    assert f"certificate for {HOST}: this edge holds the fleet's claim" in out, out
    assert f"certificate for {HOST} obtained and shared with the fleet" in out, out
    assert world.issued_orders() == 1
    out = edge2.once()
    assert f"certificate for {HOST} installed from the fleet" in out, out
    assert "asking the CA" not in out
    assert world.issued_orders() == 1

    fingerprints = {edge.served_certificate(HOST) for edge in (edge1, edge2)}
    assert len(fingerprints) == 1 and "Fingerprint" in fingerprints.pop()
    world.client_until(HOST, "hello from origin A")       # edge1, with the tunnel
    for edge in (edge1, edge2):
        pem = edge.agent_env["CONFIG_DIR"] + f"/fleet-certs/{HOST}.pem"
        mode = os.stat(pem)
        assert stat.S_IMODE(mode.st_mode) == 0o640 and mode.st_uid == 0
        assert stat.S_IMODE(os.stat(os.path.dirname(pem)).st_mode) == 0o750
    state = certificate_states(world)[HOST]
    assert state["state"] == "valid" and state["issuer_edge_name"] == "edge1"
    assert "PRIVATE" not in str(state)
    nodes = world.kokoa.request("GET", "/api/v1/edge-nodes")[2]["edge_nodes"]
    assert {n["name"]: n["certificates"][HOST]["status"] for n in nodes} == {
        "edge1": "valid", "edge2": "valid"}

    # Nothing due: further runs of both edges ask the CA for nothing.
    edge1.once()
    edge2.once()
    assert world.issued_orders() == 1

    # Renewal due (the control plane renews this long before expiry): one edge renews ...
    restart_control_plane(world, KOKOA_CERT_RENEW_BEFORE_SECONDS=str(20 * 365 * 86400))
    assert certificate_states(world)[HOST]["state"] == "expiring"
    out = edge2.once()
    assert f"certificate for {HOST} obtained and shared with the fleet" in out, out
    assert world.issued_orders() == 2
    # ... and the other installs it (with the usual window, no further renewal).
    restart_control_plane(world, KOKOA_CERT_RENEW_BEFORE_SECONDS=str(30 * 86400))
    out = edge1.once()
    assert f"certificate for {HOST} installed from the fleet" in out, out
    assert world.issued_orders() == 2
    assert len({edge.served_certificate(HOST) for edge in (edge1, edge2)}) == 1
    assert certificate_states(world)[HOST]["issuer_edge_name"] == "edge2"


def test_a_claim_holder_killed_mid_issue_hands_over_once_its_claim_expires(world, tmp_path):
    restart_control_plane(world, KOKOA_CERT_CLAIM_SECONDS="8")
    world.route(HOST, world.origin_a, 8080)
    edge1, edge2 = world.first_edge(), world.add_edge("edge2")
    edge2.once(env={"EMAIL": ""})
    slow = tmp_path / "slow-certbot"
    slow.write_text("#!/bin/sh\nsleep 60\nexec certbot \"$@\"\n")
    slow.chmod(0o755)
    holder = edge1.agent("once", env={"CERTBOT_BIN": str(slow)})
    try:
        seen = wait_until(lambda: "claimed" if (certificate_states(world)[HOST]["claim"] or {})
                          .get("holder_edge_name") == "edge1"
                          else "exited" if holder.poll() is not None else None,
                          timeout=60, interval=0.2, what="edge1's claim")
    except AssertionError:
        seen = "timed out"
    finally:
        kill_session(holder.pid)        # the agent, and certbot under its timeout(1)
        out = holder.communicate(timeout=10)[0]
    assert seen == "claimed" and "this edge holds the fleet's claim; asking the CA" in out, out
    out = edge2.once()
    assert f"certificate for {HOST}: not issued here: edge edge1 issues" in out, out
    assert world.issued_orders() == 0
    wait_until(lambda: certificate_states(world)[HOST]["claim"] is None, timeout=30,
               interval=0.5, what="edge1's claim to expire")
    # The CA reaches edge1 (pebble's default answer), whose agent is dead: its nginx still
    # answers the token from the control plane. edge2's certbot starts slower than a claim
    # lasts: its hooks extend the claim, so the certificate is not lost at the upload.
    slower = tmp_path / "slower-certbot"
    slower.write_text("#!/bin/sh\nsleep 10\nexec certbot \"$@\"\n")
    slower.chmod(0o755)
    out = edge2.once(env={"CERTBOT_BIN": str(slower)})
    assert f"certificate for {HOST} obtained and shared with the fleet" in out, out
    assert world.issued_orders() == 1
    edge1.once()
    assert edge1.served_certificate(HOST) == edge2.served_certificate(HOST)
    assert certificate_states(world)[HOST]["issuer_edge_name"] == "edge2"


def test_a_failed_issue_tells_the_fleet_why_in_certbots_words(world, tmp_path):
    world.route(HOST, world.origin_a, 8080)
    failing = tmp_path / "failing-certbot"
    failing.write_text("#!/bin/sh\necho 'Saving debug log to /dev/null'\n"
                       "echo '  Detail: 192.0.2.7: Fetching http://app.example.test/.well-known/"
                       "acme-challenge/x: Connection refused'\nexit 1\n")
    failing.chmod(0o755)
    out = world.first_edge().once(rc=None, env={"CERTBOT_BIN": str(failing)})
    reason = ("certbot failed (rc 1): Detail: 192.0.2.7: Fetching "
              "http://app.example.test/.well-known/acme-challenge/x: Connection refused")
    assert f"certificate for {HOST}: {reason}" in out, out
    state = certificate_states(world)[HOST]
    assert state["last_error"].startswith(reason) and state["next_attempt_at"], state
    assert world.issued_orders() == 0


def test_an_edge_limited_to_schema_2_keeps_its_own_certificates_and_shares_them_upgraded(
        world):
    world.route(HOST, world.origin_a, 8080)
    edge1, edge2 = world.first_edge(), world.add_edge("edge2")
    out = edge1.once(env={"AGENT_SCHEMAS": "1,2"})
    assert f"certificate for {HOST} obtained (valid until" in out, out
    assert "the fleet" not in out and "fleet-certs" not in out
    assert world.issued_orders() == 1
    assert certificate_states(world)[HOST]["state"] == "none"     # nothing shared
    world.client_until(HOST, "hello from origin A")
    before = edge1.served_certificate(HOST)
    # Upgraded to schema 3: the edge shares the certificate it has instead of ordering one,
    # and a new edge serves the same.
    out = edge1.once()
    assert f"certificate for {HOST}: this edge holds the fleet's claim; sharing its own" in out
    edge2.once()
    assert world.issued_orders() == 1
    assert edge1.served_certificate(HOST) == edge2.served_certificate(HOST) == before
    assert certificate_states(world)[HOST]["state"] == "valid"
    world.client_until(HOST, "hello from origin A")


def test_a_wildcard_route_gets_its_certificate_by_dns01_through_knot(world):
    require_tools("knotd", "kdig", "keymgr")
    knot = Knot(world.dir, "example.test",
                records=[f"{name} A 127.0.0.1" for name in ("a", "b", "app")]).start()
    try:
        restart_control_plane(world, **knot.env())
        world.pebble_with_dns(knot)
        world.route("*.example.test", world.origin_a, 8080)
        world.route("app.example.test", world.origin_a, 8082)     # exact beats the wildcard
        out = world.first_edge().once()
        assert "certificate for *.example.test obtained and shared with the fleet" in out, out
        assert "certificate for app.example.test obtained and shared" in out, out
        assert world.issued_orders() == 2
        world.client_until("a.example.test", "hello from origin A")
        world.client_until("b.example.test", "hello from origin A")
        world.client_until("app.example.test", "origin A on port 8082")
        shown = world.lab.run("client", "openssl", "s_client", "-connect",
                              f"{world.lab.address('edge')}:443", "-servername",
                              "b.example.test", input="", check=False, timeout=30).stdout
        assert "CN = *.example.test" in shown or "CN=*.example.test" in shown, shown[:2000]
        assert knot.dig("_acme-challenge.example.test", "TXT") == []       # cleaned up
        states = certificate_states(world)
        assert states["*.example.test"]["wildcard"] is True
        assert states["*.example.test"]["state"] == "valid"
    finally:
        knot.stop()


@pytest.mark.parametrize("schemas, expected", [("1,2", (6, 3)), ("1,2,3", (3, 3))],
                         ids=["per-edge (before)", "fleet (after)"])
def test_acme_orders_for_two_edges_and_three_names(world, schemas, expected):
    """Before: each edge orders each name (and the edge the CA does not reach fails); after:
    one order per name. Prints the figures (run with -s)."""
    names = ("a.example.test", "b.example.test", "c.example.test")
    for name in names:
        world.route(name, world.origin_a, 8080)
    edges = (world.first_edge(), world.add_edge("edge2"))
    for edge in edges:
        edge.once(rc=None if schemas == "1,2" else 0, env={"AGENT_SCHEMAS": schemas})
    counted = (world.new_orders(), world.issued_orders())
    print(f"\n2 edges x 3 names, AGENT_SCHEMAS={schemas}: {counted[0]} ACME orders, "
          f"{counted[1]} certificates issued")
    assert counted == expected
