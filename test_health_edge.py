"""Health measured by real edges (issue 16): agent.sh's probes and per-host counters against a
real nginx and backends, then the whole system in namespaces (netlab.World): an origin's
service stops and starts, an edge's agent stops, alert receivers answer, fail or hang.

Timings are printed (run with -s to see them); nothing asserts on speed beyond the contract's
"within two agent intervals".
"""

import os

import pytest

from conftest import free_port
from netlab import Backend, make_payload


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
