"""Health measured by real edges (issue 16): agent.sh's probes and per-host counters against a
real nginx and backends, then the whole system in namespaces (netlab.World): an origin's
service stops and starts, an edge's agent stops, alert receivers answer, fail or hang.

Timings are printed (run with -s to see them); nothing asserts on speed beyond the contract's
"within two agent intervals".
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port, require_root, require_tools, stop_process, wait_until
from netlab import AGENT, TOOLS, Backend, WebhookReceiver, World, make_payload


@pytest.fixture
def backends(backend_net):
    items = [Backend("alpha", backend_net), Backend("beta", backend_net)]
    yield items
    for item in items:
        item.close()


def health_log(edge):
    return edge.state_dir / "health" / "access.log"


def test_agent_reports_origins_and_per_host_counters(edge, double, backends, backend_net):
    alpha, beta = backends
    dead_port = free_port()             # nothing listens there (on the backends' address)
    dead = f"{backend_net.address}:{dead_port}"
    double.payload = make_payload({"a.example.com": alpha.addr, "b.example.com": beta.addr,
                                   "c.example.com": dead})
    edge.once()
    first = double.reports[-1]
    assert first["interval_s"] == 30 and first["schema"] == 1
    origin = first["origins"][backend_net.address]
    assert origin["reachable"] is True and origin["handshake_age_s"] is None
    assert 0 <= origin["rtt_ms"] < 2000
    ports = {int(port): up for port, up in origin["ports"].items()}
    assert ports == {int(alpha.addr.split(":")[1]): True, int(beta.addr.split(":")[1]): True,
                     dead_port: False}
    assert first["hosts"] == {}
    assert "log_format kokoa_health" in (edge.config_dir / "default.conf").read_text()

    for _ in range(3):
        assert edge.get("a.example.com")[0] == 200
    assert edge.get("c.example.com")[0] == 502
    assert edge.get("unknown.example.com")[0] == 404        # not a route: not reported
    edge.once()
    hosts = double.reports[-1]["hosts"]
    assert set(hosts) == {"a.example.com", "c.example.com"}
    assert hosts["a.example.com"] | {"window_s": 0} == {
        "requests": 3, "status_4xx": 0, "status_5xx": 0, "upstream_errors": 0, "window_s": 0}
    assert hosts["c.example.com"]["status_5xx"] == 1
    assert hosts["c.example.com"]["upstream_errors"] == 1
    assert hosts["a.example.com"]["window_s"] >= 0

    # No traffic since: the counters go back to nothing once, then nothing more is sent.
    reports = len(double.reports)
    edge.once()
    assert len(double.reports) == reports + 1 and double.reports[-1]["hosts"] == {}
    edge.once()
    assert len(double.reports) == reports + 1
    assert edge.stray_files() == []


def test_the_per_host_log_stays_bounded_without_a_reload(edge, double, backends):
    double.payload = make_payload({"a.example.com": backends[0].addr})
    edge.once()
    reloads = edge.reload_count()
    with health_log(edge).open("a") as log:        # a flood of requests for unknown names
        line = "flood.example.com 404 - -\n"
        log.write(line * (8 * 1024 * 1024 // len(line) + 10))
    assert edge.get("a.example.com")[0] == 200
    edge.once()
    assert health_log(edge).stat().st_size < 1024
    assert double.reports[-1]["hosts"]["a.example.com"]["requests"] == 1
    assert edge.reload_count() == reloads
    assert edge.get("a.example.com")[0] == 200      # nginx still logs into the same file
    edge.once()
    assert double.reports[-1]["hosts"]["a.example.com"]["requests"] == 1
    assert (edge.state_dir / "health" / "offset").read_text().strip() != "0"


def test_a_log_rotated_by_someone_else_is_read_from_its_start(edge, double, backends):
    double.payload = make_payload({"a.example.com": backends[0].addr})
    edge.once()
    for _ in range(2):
        edge.get("a.example.com")
    edge.once()
    os.truncate(health_log(edge), 0)              # logrotate's copytruncate
    edge.get("a.example.com")
    edge.once()
    assert double.reports[-1]["hosts"]["a.example.com"]["requests"] == 1


def test_an_older_control_plane_gets_the_report_without_measurements(edge, double, backends):
    double.refuse_field = "interval_s"
    double.payload = make_payload({"a.example.com": backends[0].addr})
    proc = edge.once()
    assert "does not take health measurements yet" in proc.stderr
    report = double.reports[-1]
    assert report["applied_hash"] == double.payload["config_hash"]
    assert not {"interval_s", "origins", "hosts"} & report.keys()
    assert edge.stray_files() == []


# The whole system in namespaces ###########################################################

@pytest.fixture
def world():
    """netlab.World with alert retries made short (set before it starts the control plane)."""
    require_root()
    require_tools(*TOOLS)
    workdir = Path(tempfile.mkdtemp(prefix="kokoa-health-", dir="/tmp"))
    workdir.chmod(0o755)
    world = World(workdir)
    world.kokoa.env.update({"KOKOA_ALERT_RETRY_DELAYS": "0.2,0.5", "KOKOA_ALERT_TIMEOUT": "1"})
    try:
        yield world.build()
    finally:
        world.close()
        shutil.rmtree(workdir, ignore_errors=True)


def service_process(world, port):
    """The Popen of the World's http.server on `port`."""
    return next(proc for proc in world.lab.procs if proc.poll() is None
                and "http.server" in proc.args and str(port) in proc.args)


def site_state(world, hostname):
    _, _, body = world.kokoa.request("GET", "/api/v1/sites")
    return next(site for site in body["sites"] if site["hostname"] == hostname), body


def deliveries(world, target):
    return world.kokoa.request(
        "GET", f"/api/v1/alert-targets/{target['id']}/deliveries")[2]["deliveries"]


def test_an_origin_down_and_an_edge_gone_reach_the_sites_and_the_webhooks(world):
    receiver, failing = WebhookReceiver(), WebhookReceiver(status=500)
    agent = None
    try:
        world.route("app.example.test", world.origin_a, 8080)
        world.agent_once()                        # certificates, config, first report
        world.client_until("app.example.test", "hello from origin A")
        interval = 2
        agent = world.lab.start("edge", "bash", str(AGENT), "run",
                                env={**world.agent_env, "POLL_INTERVAL": str(interval)},
                                log_path=world.dir / "agent-run.log")
        wait_until(lambda: site_state(world, "app.example.test")[0]["state"] == "ok",
                   timeout=30, interval=0.2, what="the site to be ok")
        # (Targets made now: before its edge's first poll, the new site was down, truly.)
        _, _, target = world.kokoa.request("POST", "/api/v1/alert-targets", {
            "name": "ops", "url": receiver.url + "/kokoa",
            "events": ["site_down", "origin_down", "edge_offline"]})
        _, _, broken = world.kokoa.request("POST", "/api/v1/alert-targets", {
            "name": "broken", "url": failing.url + "/", "events": ["site_down"]})
        assert receiver.received == [] and failing.received == []

        # The origin's service stops: the site is down with the reason, one webhook arrives.
        stop_process(service_process(world, 8080))
        stopped = time.monotonic()
        site = wait_until(lambda: (lambda s: s["state"] == "down" and s)(
            site_state(world, "app.example.test")[0]), timeout=30, interval=0.1,
            what="the site to be down")
        down_at = time.monotonic()
        wait_until(lambda: any(b["event"] == "site_down" for b in receiver.json_bodies()),
                   timeout=20, interval=0.1, what="the site_down webhook")
        webhook_at = next(item["at"] for item in receiver.received
                          if json.loads(item["body"])["event"] == "site_down")
        print(f"\norigin stopped -> site down in the API: {down_at - stopped:.2f} s; "
              f"-> webhook received: {webhook_at - stopped:.2f} s (agent interval {interval} s)")
        assert down_at - stopped < 2 * interval + 2 * 2 + 3     # two intervals, two runs
        [why] = [r for r in site["reasons"] if r["kind"] == "origin"]
        assert why["edge_name"] == "edge1" and "port 8080" in why["message"]

        # It starts again: ok, and one "resolved" delivery per event.
        world._service("origin-a", "10.8.0.2", 8080, "hello from origin A")
        wait_until(lambda: site_state(world, "app.example.test")[0]["state"] == "ok",
                   timeout=30, interval=0.2, what="the site to be ok again")
        wait_until(lambda: len(receiver.received) >= 4, timeout=20, what="resolved webhooks")
        time.sleep(2 * interval)                  # more runs: nothing more is sent
        assert sorted((b["event"], b["state"]) for b in receiver.json_bodies()) == [
            ("origin_down", "firing"), ("origin_down", "resolved"),
            ("site_down", "firing"), ("site_down", "resolved")]

        # The receiver that fails: retried, recorded as failed, nothing else harmed.
        failed = wait_until(lambda: [d for d in deliveries(world, broken)
                                     if d["state"] == "failed"], timeout=20,
                            what="the failing receiver's deliveries to fail")
        assert failed[-1]["attempts"] == 3 and failed[-1]["status_code"] == 500
        assert deliveries(world, target)[0]["state"] == "delivered"

        # The edge's agent stops: stale, then offline, and one edge_offline alert.
        stop_process(agent)
        gone = time.monotonic()
        wait_until(lambda: site_state(world, "app.example.test")[1]["edges"][0]["state"]
                   == "stale", timeout=30, interval=0.2, what="the edge to be stale")
        stale_at = time.monotonic()
        wait_until(lambda: site_state(world, "app.example.test")[1]["edges"][0]["state"]
                   == "offline", timeout=60, interval=0.2, what="the edge to be offline")
        offline_at = time.monotonic()
        wait_until(lambda: any(b["event"] == "edge_offline" for b in receiver.json_bodies()),
                   timeout=20, what="the edge_offline webhook")
        print(f"agent stopped -> stale: {stale_at - gone:.1f} s, offline: "
              f"{offline_at - gone:.1f} s, edge_offline webhook: "
              f"{receiver.received[-1]['at'] - gone:.1f} s")
        assert site_state(world, "app.example.test")[0]["state"] == "down"
        offline = [b for b in receiver.json_bodies() if b["event"] == "edge_offline"]
        assert len(offline) == 1 and "edge1" in offline[0]["message"]
        assert world.kokoa.request("GET", "/healthz")[0] == 200
    finally:
        if agent is not None:
            stop_process(agent)
        receiver.close()
        failing.close()
