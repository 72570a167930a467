"""End-to-end tests of the edge agent (agent.sh) and install-edge.sh.

Real processes only: a private nginx under a temporary prefix on free loopback ports, the agent run
as `bash agent.sh once`, a crafted control-plane double (http.server) for hostile payloads, the
real `kokoa.py serve` when it is there, certbot against a real pebble, and small Python HTTP
servers as backends. Every process is stopped by pid; every wait is bounded.
"""

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, KokoaServer, free_port, require, require_tools, stop_process, wait_until
from kokoa import UPSTREAM_KEEPALIVE, policy_key, render_nginx_map, upstream_name
from netlab import (
    AGENT,
    TOKEN,
    Backend,
    Edge,
    NetnsBackends,
    Nginx,
    Pebble,
    access_policy,
    make_payload,
    rehash,
)

INSTALL = REPO / "install-edge.sh"


# ---------------------------------------------------------------------------------------------
# Fixtures: the control-plane double, backends and the edge (netlab.py); payloads by kokoa.py


@pytest.fixture
def backends(backend_net):
    items = [Backend("alpha", backend_net), Backend("beta", backend_net)]
    yield items
    for item in items:
        item.close()


def apply_routes(edge, double, routes, **kwargs):
    """Serve `routes` from the double, run `once`, return the payload."""
    double.payload = make_payload(routes, **kwargs)
    edge.once()
    return double.payload


# ---------------------------------------------------------------------------------------------
# Static checks and CLI


def test_scripts_pass_shellcheck_and_bash_n():
    require_tools("shellcheck")
    for script in (AGENT, INSTALL):
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
        proc = subprocess.run(["shellcheck", "-x", "-o", "check-set-e-suppressed", str(script)],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert proc.returncode == 0, proc.stdout


def test_help_and_usage_errors():
    proc = subprocess.run(["bash", str(AGENT), "--help"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0 and "once" in proc.stdout and "NODE_TOKEN" in proc.stdout
    proc = subprocess.run(["bash", str(AGENT), "frobnicate"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


def test_plain_http_control_plane_is_refused_unless_loopback_or_allowed(edge):
    proc = edge.agent("once", env={"CONTROL_PLANE_URL": "http://192.0.2.1:9"})
    assert proc.returncode == 2 and "refusing plain-http" in proc.stderr
    assert not (edge.config_dir / "map.conf").exists()
    for disguised in ("http://127.0.0.1@192.0.2.1:9/", "http://127.example.net:9/"):
        proc = edge.agent("once", env={"CONTROL_PLANE_URL": disguised})
        assert proc.returncode == 2, (disguised, proc.stderr)
    proc = edge.agent("once", env={"CONTROL_PLANE_URL": "http://127.0.0.1:9",
                                   "KOKOA_INSECURE_HTTP": "1"})
    assert proc.returncode == 1 and "cannot reach the control plane" in proc.stderr


def test_env_file_is_parsed_not_sourced(edge, double, backends, workdir):
    marker = workdir / "pwned"
    env_file = workdir / "edge.env"
    env_file.write_text(
        "# comment\n\n"
        f"CONTROL_PLANE_URL=\"{double.url}\"\n"
        f"NODE_TOKEN='{TOKEN}'\n"
        f"EMAIL=$(touch {marker})\n"
        f"SOMETHING_ELSE=`touch {marker}`\n")
    env_file.chmod(0o600)
    double.payload = make_payload({"a.example.com": backends[0].addr})
    env = {k: v for k, v in edge.env.items() if k not in ("CONTROL_PLANE_URL", "NODE_TOKEN")}
    proc = subprocess.run(["bash", str(AGENT), "--env-file", str(env_file), "once"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "unknown setting SOMETHING_ELSE" in proc.stderr
    assert not marker.exists()
    assert edge.server_files() == ["a.example.com.conf"]


# ---------------------------------------------------------------------------------------------
# Applying configs


def test_the_origin_sees_the_edge_s_forwarding_headers_never_the_client_s(edge, double,
                                                                       backends):
    alpha, _ = backends
    apply_routes(edge, double, {"a.example.com": alpha.addr})
    spoofed = ["-H", "X-Forwarded-Host: attacker.example", "-H", "X-Forwarded-For: 6.6.6.6",
               "-H", "Forwarded: for=6.6.6.6;host=attacker.example", "-H",
               "X-Forwarded-Port: 1", "-H", "X-Real-IP: 6.6.6.6"]
    assert edge.get("a.example.com", "/h", tls=True, extra=spoofed) == (200, "alpha /h")
    seen = alpha.seen[-1]
    assert seen["X-Forwarded-Host"] == "a.example.com"
    assert seen["X-Forwarded-Port"] == str(edge.https_port)
    assert seen["X-Forwarded-For"] == seen["X-Real-IP"] == "127.0.0.1"
    assert "Forwarded" not in seen
    # the edge does not say which nginx it runs, and sets no HSTS on a fallback certificate
    head = subprocess.run(
        ["curl", "-sSkI", "--max-time", "10", "--resolve",
         f"a.example.com:{edge.https_port}:127.0.0.1", f"https://a.example.com:{edge.https_port}/"],
        capture_output=True, text=True, timeout=20).stdout.lower()
    assert "\nserver: nginx\n" in head and "strict-transport-security" not in head


def test_route_options_of_schema_2_are_rendered_per_host(edge, double, backends):
    alpha, beta = backends
    limited = {"upstream": alpha.addr, "max_body_size": 5, "buffering": True, "hsts": False}
    streamed = {"upstream": beta.addr, "max_body_size": 0, "buffering": False, "hsts": True}
    apply_routes(edge, double, {"small.example.com": limited, "sse.example.com": streamed},
                 schema=2)
    small = (edge.config_dir / "servers/small.example.com.conf").read_text()
    sse = (edge.config_dir / "servers/sse.example.com.conf").read_text()
    assert "client_max_body_size 5m;" in small and "proxy_buffering off;" not in small
    assert "client_max_body_size 0;" in sse and "proxy_buffering off;" in sse
    assert "proxy_read_timeout 3600s;" in sse.split("location @kokoa_upgrade")[0]
    # 6 MiB to a 5 MiB route: refused at the edge, the origin never sees it
    body = edge.root / "six-mib"
    body.write_bytes(b"x" * (6 << 20))
    code, _ = edge.get("small.example.com", "/upload", tls=True,
                       extra=["-X", "POST", "--data-binary", f"@{body}"])
    assert code == 413
    assert alpha.seen == []


def test_the_rendered_config_passes_nginx_t_under_debians_own_nginx_conf(edge, double,
                                                                        backends, workdir):
    """Debian's nginx.conf sets ssl_protocols, ssl_prefer_server_ciphers and gzip in http{}:
    the agent's server-level settings must not be duplicates of them."""
    stock = Path("/etc/nginx/nginx.conf")
    require(stock.is_file() and "include /etc/nginx/sites-enabled/*;" in stock.read_text(),
            "Debian's stock /etc/nginx/nginx.conf is not installed")
    alpha, _ = backends
    apply_routes(edge, double, {"a.example.com": {"upstream": alpha.addr, "max_body_size": 5,
                                                  "buffering": False, "hsts": True}}, schema=2)
    conf = workdir / "debian-nginx.conf"
    conf.write_text(stock.read_text().replace(
        "include /etc/nginx/sites-enabled/*;",
        f"include {edge.config_dir}/*.conf;\n\tinclude {edge.config_dir}/servers/*.conf;"))
    result = subprocess.run(["nginx", "-t", "-c", str(conf)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert "duplicate" not in result.stderr and "warn" not in result.stderr, result.stderr


def test_each_hostname_reaches_its_backend_over_http_and_fallback_tls(edge, double, backends):
    alpha, beta = backends
    apply_routes(edge, double, {"a.example.com": alpha.addr, "b.example.com": beta.addr})
    assert edge.server_files() == ["a.example.com.conf", "b.example.com.conf"]
    assert edge.get("a.example.com", "/x") == (200, "alpha /x")
    assert edge.get("b.example.com", "/y") == (200, "beta /y")
    assert edge.get("b.example.com", "/z", tls=True) == (200, "beta /z")
    seen = beta.seen[-1]
    assert seen["Host"] == "b.example.com" and seen["X-Forwarded-Proto"] == "https"
    assert seen["X-Real-IP"] == "127.0.0.1" and seen["X-Forwarded-For"] == "127.0.0.1"
    # Unknown names: 404 on port 80, no TLS handshake on 443.
    assert edge.get("unknown.example.com")[0] == 404
    code, err = edge.get("unknown.example.com", tls=True)
    assert code is None and "unrecognized name" in err
    report = double.reports[-1]
    assert report["ok"] is True and report["applied_hash"] == double.payload["config_hash"]
    assert report["certificates"] == {"a.example.com": {"status": "pending"},
                                      "b.example.com": {"status": "pending"}}
    assert edge.stray_files() == []


def test_second_once_is_a_304_and_touches_nothing(edge, double, backends):
    payload = apply_routes(edge, double, {"a.example.com": backends[0].addr})
    before = edge.snapshot()
    state_before = {p: p.stat().st_mtime_ns for p in edge.state_dir.rglob("*") if p.is_file()}
    reports = len(double.reports)
    proc = edge.once()
    assert "config unchanged" in proc.stdout
    assert double.config_requests[-1]["If-None-Match"] == f'"{payload["config_hash"]}"'
    assert edge.snapshot() == before
    state_after = {p: p.stat().st_mtime_ns for p in edge.state_dir.rglob("*") if p.is_file()}
    assert state_after == state_before
    assert edge.reload_count() == 1 and len(double.reports) == reports


PEER = {"public_key": "k" * 43 + "=", "allowed_ips": ["10.8.0.2/32"]}


def test_same_files_under_a_new_hash_do_not_reload(edge, double, backends):
    apply_routes(edge, double, {"a.example.com": backends[0].addr})
    before = edge.snapshot()
    payload = make_payload({"a.example.com": backends[0].addr}, peers=[PEER])
    double.payload = payload
    proc = edge.once()
    assert "already up to date" in proc.stdout
    assert edge.snapshot() == before and edge.reload_count() == 1
    assert double.reports[-1]["applied_hash"] == payload["config_hash"]


def test_missing_wireguard_interface_is_reported_while_nginx_is_applied(edge, double, backends):
    payload = make_payload({"a.example.com": backends[0].addr}, peers=[PEER])
    double.payload = payload
    proc = edge.once(rc=1, env={"WG_INTERFACE": "kkmissing0"})
    assert "WireGuard kkmissing0: the interface does not exist" in proc.stderr
    assert edge.get("a.example.com") == (200, "alpha /")
    report = double.reports[-1]
    assert report["ok"] is False and "kkmissing0" in report["error"]
    assert report["applied_hash"] == payload["config_hash"]
    edge.once(rc=0)                     # WireGuard no longer managed: the error clears
    assert double.reports[-1]["ok"] is True and "error" not in double.reports[-1]


def test_removing_a_route_removes_its_file(edge, double, backends):
    alpha, beta = backends
    apply_routes(edge, double, {"a.example.com": alpha.addr, "b.example.com": beta.addr})
    apply_routes(edge, double, {"a.example.com": alpha.addr})
    assert edge.server_files() == ["a.example.com.conf"]
    assert edge.get("b.example.com")[0] == 404
    assert edge.get("a.example.com") == (200, "alpha /")


def bad_for_nginx(routes):
    """A payload that passes every pattern but fails `nginx -t` (keepalive 0 is invalid)."""
    return make_payload(routes, nginx_map=render_nginx_map(routes).replace(
        f"keepalive {UPSTREAM_KEEPALIVE[1]};", "keepalive 0;"))


def test_config_failing_nginx_t_is_rolled_back_and_reported(edge, double, backends):
    alpha, beta = backends
    apply_routes(edge, double, {"a.example.com": alpha.addr})
    before = edge.snapshot()
    double.payload = bad_for_nginx({"a.example.com": beta.addr, "c.example.com": beta.addr})
    proc = edge.once(rc=1)
    assert "nginx -t failed" in proc.stderr and "restored the previous" in proc.stdout
    assert edge.snapshot() == before and edge.reload_count() == 1
    assert edge.get("a.example.com") == (200, "alpha /")
    report = double.reports[-1]
    assert report["ok"] is False and "keepalive" in report["error"]
    assert report["applied_hash"] == make_payload({"a.example.com": alpha.addr})["config_hash"]
    assert edge.stray_files() == []
    # The same broken payload is not retried on every poll.
    proc = edge.once(rc=1)
    assert "retrying it after" in proc.stderr
    assert sum(1 for c in edge.nginx.calls() if c == "-t") == 2


def test_certificate_broken_under_the_agent_fails_nginx_t_and_keeps_serving(
        edge, double, backends):
    alpha, beta = backends
    apply_routes(edge, double, {"a.example.com": alpha.addr})
    before = edge.snapshot()
    Path(edge.env["FALLBACK_CERT"]).write_text("not a certificate\n")
    double.payload = make_payload({"a.example.com": alpha.addr, "b.example.com": beta.addr})
    proc = edge.once(rc=1)
    assert "nginx -t failed" in proc.stderr
    assert edge.snapshot() == before
    assert edge.get("a.example.com") == (200, "alpha /")
    assert edge.get("a.example.com", tls=True) == (200, "alpha /")
    report = double.reports[-1]
    assert report["ok"] is False and "nginx -t failed" in report["error"]


def test_first_ever_config_failing_nginx_t_leaves_no_files(edge, double, backends):
    double.payload = bad_for_nginx({"a.example.com": backends[0].addr})
    edge.once(rc=1)
    assert edge.snapshot() == {} and edge.stray_files() == []
    assert double.reports[-1]["ok"] is False and double.reports[-1]["applied_hash"] is None


def test_reload_failure_restores_previous_files(edge, double, backends):
    alpha, beta = backends
    apply_routes(edge, double, {"a.example.com": alpha.addr})
    before = edge.snapshot()
    double.payload = make_payload({"b.example.com": beta.addr})
    proc = edge.once(rc=1, env={"KOKOA_TEST_NGINX_FAIL_RELOAD": "1"})
    assert "reload failed" in proc.stderr
    assert edge.snapshot() == before
    assert edge.get("a.example.com") == (200, "alpha /")


def test_sigterm_during_nginx_t_restores_previous_files(edge, double, backends, workdir):
    alpha, beta = backends
    apply_routes(edge, double, {"a.example.com": alpha.addr})
    before = edge.snapshot()
    double.payload = make_payload({"b.example.com": beta.addr, "c.example.com": beta.addr})
    hang = workdir / "hanging"
    proc = subprocess.Popen(["bash", str(AGENT), "once"],
                            env=dict(edge.env, KOKOA_TEST_NGINX_HANG=str(hang)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(hang.exists, timeout=30, what="agent to reach nginx -t")
        assert edge.snapshot() != before          # the new files are in place during -t
        for pid in Path("/proc").iterdir():       # the token is never on a command line
            try:
                assert TOKEN.encode() not in (pid / "cmdline").read_bytes()
            except OSError:
                pass
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    finally:
        stop_process(proc)
    assert proc.returncode == 143
    assert edge.snapshot() == before and edge.stray_files() == []
    assert edge.get("a.example.com") == (200, "alpha /")


def test_power_loss_during_nginx_t_is_repaired_by_recover_before_nginx_starts(
        edge, double, backends, workdir):
    alpha, beta = backends
    apply_routes(edge, double, {"a.example.com": alpha.addr})
    before = edge.snapshot()
    double.payload = bad_for_nginx({"a.example.com": beta.addr})
    hang = workdir / "hanging"
    proc = subprocess.Popen(["bash", str(AGENT), "once"],
                            env=dict(edge.env, KOKOA_TEST_NGINX_HANG=str(hang)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until(hang.exists, timeout=30, what="agent to reach nginx -t")
        os.killpg(proc.pid, signal.SIGKILL)       # no trap runs: as if the power went
        proc.wait(timeout=15)
    finally:
        stop_process(proc)
    assert edge.snapshot() != before              # the broken files are live on disk
    edge.nginx.stop()                             # ... and the machine reboots
    edge.agent("recover", check_rc=0)             # nginx's ExecStartPre
    assert edge.snapshot() == before
    edge.nginx.start()
    assert edge.get("a.example.com") == (200, "alpha /")


def test_lock_held_exits_0_and_touches_nothing(edge, double, backends):
    double.payload = make_payload({"a.example.com": backends[0].addr})
    edge.state_dir.mkdir(parents=True, exist_ok=True)
    with open(edge.state_dir / "agent.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = edge.once()
    assert "another run holds" in proc.stdout
    assert edge.snapshot() == {} and double.config_requests == []


@pytest.mark.parametrize("status", [401, 500])
def test_http_errors_exit_1_with_one_line_and_touch_nothing(edge, double, backends, status):
    apply_routes(edge, double, {"a.example.com": backends[0].addr})
    before = edge.snapshot()
    double.status = status
    proc = edge.once(rc=1)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"HTTP {status}" in proc.stderr
    assert edge.snapshot() == before and edge.reload_count() == 1


def test_control_plane_down_leaves_nginx_serving(edge, double, backends):
    apply_routes(edge, double, {"a.example.com": backends[0].addr})
    before = edge.snapshot()
    double.close()
    proc = edge.once(rc=1)
    assert proc.stderr.count("\n") == 1 and "cannot reach the control plane" in proc.stderr
    assert edge.snapshot() == before
    assert edge.get("a.example.com") == (200, "alpha /")


def test_a_status_report_without_an_answer_is_warned_of_with_curls_reason(
        edge, double, backends):
    apply_routes(edge, double, {"a.example.com": backends[0].addr})
    double.hang_up.add("/api/v1/edge-nodes/me/status")
    double.payload = make_payload({"a.example.com": backends[1].addr})
    proc = edge.once()
    assert "could not report status to the control plane (HTTP 000: curl: (52) Empty reply " \
           "from server)" in proc.stderr, proc.stderr
    assert edge.get("a.example.com") == (200, "beta /")


def test_control_plane_errors_then_slowness_keep_serving_and_converge(edge, double, backends):
    apply_routes(edge, double, {"a.example.com": backends[0].addr})
    double.status = 500
    failed = edge.once(rc=1)
    assert "HTTP 500" in failed.stderr and failed.stderr.count("\n") == 1
    assert edge.get("a.example.com") == (200, "alpha /")
    double.status = None
    double.delay = 10.0                 # a control plane that takes 10 s to answer
    double.payload = make_payload({"a.example.com": backends[1].addr})
    started = time.monotonic()
    edge.once()
    assert time.monotonic() - started >= 10
    assert edge.get("a.example.com") == (200, "beta /")
    assert double.reports[-1]["applied_hash"] == double.payload["config_hash"]


def test_run_backs_off_on_network_errors_and_stops_on_sigterm(edge):
    env = dict(edge.env, CONTROL_PLANE_URL=f"http://127.0.0.1:{free_port()}")
    proc = subprocess.Popen(["bash", str(AGENT), "run"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("backing off" in x for x in lines):
            lines.append(proc.stdout.readline())
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert time.monotonic() - started < 5
    finally:
        stop_process(proc)
    backoff = [x for x in lines if "backing off" in x]
    assert backoff, lines
    delay = int(backoff[0].split("backing off ")[1].split("s")[0])
    assert 4 <= delay <= 6
    assert proc.returncode == 143


# ---------------------------------------------------------------------------------------------
# Hostile payloads: rejected whole, nothing written, error reported


def hostile_payloads():
    good = {"a.example.com": "10.8.0.2:8080"}
    cases = {}

    def tampered(hostname="a.example.com", upstream="10.8.0.2:8080"):
        """The good payload with a value kokoa would refuse to render put in every field."""
        p = make_payload(good)
        p["hostnames"] = [hostname]
        p["routes"] = {hostname: upstream}
        p["nginx_map"] = (p["nginx_map"]
                          .replace(upstream_name(good["a.example.com"]), upstream_name(upstream))
                          .replace(" a.example.com ", f" {hostname} ")
                          .replace(" 10.8.0.2:8080;", f" {upstream};"))
        return rehash(p)

    for label, hostname in (("directive", "a.example.com;include /etc/passwd"),
                            ("newline", "a.example.com\n}"),
                            ("dollar", "$host.example.com"), ("quote", 'a"b.example.com'),
                            ("apostrophe", "a'b.example.com"), ("slash", "../../etc/passwd"),
                            ("path", "a/b.example.com"), ("brace", "a}.example.com"),
                            ("10000-chars", "a" * 10000 + ".example.com")):
        cases[f"hostname-with-{label}"] = tampered(hostname)
    cases["truncated-json"] = json.dumps(make_payload(good)).encode()[:120]
    cases["ip-as-hostname"] = make_payload({"10.1.2.3": "10.8.0.2:8080"})
    cases["single-label"] = make_payload({"localhost": "10.8.0.2:8080"})
    cases["upper-case"] = tampered("A.example.com")
    cases["route-injection"] = tampered(upstream="10.8.0.2:8080; evil")
    cases["route-hostname"] = tampered(upstream="evil.example.net:80")
    cases["route-bad-port"] = make_payload({"a.example.com": "10.8.0.2:70000"})
    keepalive = f"    keepalive {UPSTREAM_KEEPALIVE[1]};\n"
    cases["map-extra-directive"] = make_payload(good, nginx_map=render_nginx_map(good).replace(
        keepalive, keepalive + "    include /etc/shadow;\n"))
    cases["map-other-backend"] = make_payload(
        good, nginx_map=render_nginx_map({"a.example.com": "10.9.9.9:22"}))
    cases["map-extra-host"] = make_payload(
        good, nginx_map=render_nginx_map(dict(good, **{"b.example.com": "10.8.0.2:8080"})))
    cases["map-server-block"] = make_payload(
        good, nginx_map=render_nginx_map(good) + "server { listen 81; }\n")
    cases["hostnames-differ-from-routes"] = make_payload(good, hostnames=["b.example.com"])
    p = make_payload(good)
    p["config_hash"] = "0" * 64
    cases["wrong-hash"] = p
    # Access policies (schema 2): a fault in their shape refuses the whole payload (a fault in a
    # value takes only the policy's routes out: test_access.py).
    policy = access_policy(users=[("alice", "$6$salt$" + "h" * 86)])
    key = policy_key(policy)
    for label, damage in (
            ("unknown-key", lambda p: p["access"][key].update(note="x")),
            ("missing-key", lambda p: p["access"][key].pop("require")),
            ("user-with-password", lambda p: p["access"][key]["users"][0].update(password="x")),
            ("forward-auth-keys", lambda p: p["access"][key].update(
                forward_auth={"upstream": "10.8.0.2:9091"})),
            ("key-not-hex", lambda p: p["access"].update({"include /etc/passwd": policy})),
            ("not-an-object", lambda p: p["access"].update({key: [policy]})),
            ("route-access-not-a-key", lambda p: p["routes"]["a.example.com"].update(
                access="../../etc/passwd")),
            ("access-not-an-object", lambda p: p.update(access=[]))):
        p = json.loads(json.dumps(make_payload({"a.example.com": {
            "upstream": "10.8.0.2:8080", "access": policy}}, schema=2)))
        damage(p)
        cases[f"access-{label}"] = rehash(p)
    cases["not-json"] = b"<html>oops</html>"
    cases["not-an-object"] = b"[1, 2, 3]"
    return cases


HOSTILE = hostile_payloads()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_payload_never_reaches_a_file(name, workdir, double):
    require_tools("jq", "curl", "flock", "openssl")
    edge = Edge(workdir, double.url)            # nginx need not even run: nothing gets that far
    double.payload = HOSTILE[name]
    proc = edge.agent("once")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "rejected" in proc.stderr or "not valid JSON" in proc.stderr
    assert edge.snapshot() == {} and edge.nginx.calls() == []
    assert double.reports[-1]["ok"] is False


def test_etag_differing_from_config_hash_is_rejected(workdir, double):
    require_tools("jq", "curl", "flock", "openssl")
    edge = Edge(workdir, double.url)
    double.payload = make_payload({"a.example.com": "10.8.0.2:8080"})
    double.etag = "f" * 64
    proc = edge.agent("once", check_rc=1)
    assert "ETag" in proc.stderr and edge.snapshot() == {}


# ---------------------------------------------------------------------------------------------
# Certificates: certbot against a real pebble


def test_pebble_certificates_switch_hosts_to_tls_and_back_off_failing_ones(
        edge, double, backends, workdir):
    require_tools("pebble", "pebble-challtestsrv", "certbot")
    alpha, beta = backends
    pebble = Pebble(workdir, edge.http_port)
    try:
        pebble.start()
        pebble.add_a("bad.example.com", "127.0.0.2")    # nginx does not listen there
        edge.env.update(EMAIL="ops@example.com", ACME_SERVER=pebble.directory,
                        ACME_CA_BUNDLE=str(pebble.ca), EDGE_FQDN="edge.example.com")
        double.payload = make_payload({"good.example.com": alpha.addr,
                                       "bad.example.com": beta.addr})
        proc = edge.once()
    finally:
        pebble.stop()
    assert "certificate for good.example.com obtained" in proc.stdout, proc.stdout + proc.stderr
    assert "certificate for bad.example.com: certbot failed" in proc.stderr
    root = pebble.root
    assert edge.get("good.example.com", "/s", tls=True, cacert=root) == (200, "alpha /s")
    code, _ = edge.get("good.example.com", "/p?q=1")
    assert code == 301
    location = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{redirect_url}", "--resolve",
         f"good.example.com:{edge.http_port}:127.0.0.1",
         f"http://good.example.com:{edge.http_port}/p?q=1"],
        capture_output=True, text=True, timeout=20).stdout
    assert location == f"https://good.example.com:{edge.https_port}/p?q=1"
    # The failing host keeps working on http and on the fallback certificate.
    assert edge.get("bad.example.com", "/b") == (200, "beta /b")
    assert edge.get("bad.example.com", "/b", tls=True, cacert=root)[0] is None
    assert edge.get("bad.example.com", "/b", tls=True) == (200, "beta /b")
    assert edge.get("edge.example.com", "/healthz", tls=True, cacert=root) == (200, "ok\n")
    certs = double.reports[-1]["certificates"]
    assert certs["good.example.com"]["status"] == "valid"
    assert certs["good.example.com"]["not_after"] > time.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert certs["bad.example.com"]["status"] == "failed" and certs["bad.example.com"]["error"]
    fails, next_try = (edge.state_dir / "certs/bad.example.com.state").read_text().split()[:2]
    assert fails == "1" and int(next_try) >= time.time() + 250
    # Next run: the failing host is in back-off, so certbot is not called at all.
    before = edge.snapshot()
    proc = edge.once()
    assert "certonly" not in proc.stdout and edge.snapshot() == before
    status = edge.agent("status", check_rc=0).stdout
    assert "good.example.com" in status and "valid until" in status and "failed 1x" in status


def test_staging_setting_passes_staging_to_certbot(edge, double, backends, workdir):
    calls = workdir / "certbot-calls"
    fake = workdir / "certbot"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {calls}\n"
                    "echo '  Detail: simulated failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    edge.env.update(EMAIL="ops@example.com", CERTBOT_BIN=str(fake))
    double.payload = make_payload({"a.example.com": backends[0].addr}, staging=True)
    edge.once()
    args = calls.read_text().split()
    assert "--staging" in args and "--server" not in args
    assert args[args.index("-d") + 1] == "a.example.com"
    assert args[args.index("--config-dir") + 1] == edge.env["LETSENCRYPT_DIR"]
    assert str(edge.state_dir) in args[args.index("--work-dir") + 1]
    report = double.reports[-1]["certificates"]["a.example.com"]
    assert report == {"status": "failed",
                      "error": "certbot failed (rc 1): Detail: simulated failure"}


def test_renewal_runs_certbot_renew_with_a_reload_hook_when_due(edge, double, workdir):
    calls = workdir / "certbot-calls"
    fake = workdir / "certbot"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {calls}\nexit 0\n")
    fake.chmod(0o755)
    renewal = Path(edge.env["LETSENCRYPT_DIR"]) / "renewal"
    renewal.mkdir(parents=True)
    (renewal / "a.example.com.conf").write_text("# certbot renewal config\n")
    edge.env.update(EMAIL="ops@example.com", CERTBOT_BIN=str(fake), RENEW_INTERVAL="3600")
    edge.once()
    edge.once()                                  # within RENEW_INTERVAL: no second renew
    renews = [line.split() for line in calls.read_text().splitlines()
              if line.startswith("renew")]
    assert len(renews) == 1
    args = renews[0]
    assert "--no-random-sleep-on-renew" in args
    assert args[args.index("--config-dir") + 1] == edge.env["LETSENCRYPT_DIR"]
    assert args[args.index("--deploy-hook") + 1] == str(edge.nginx.wrapper)
    assert args[args.index("--deploy-hook") + 2] == "-s"


# ---------------------------------------------------------------------------------------------
# With the real control plane


@pytest.fixture
def netns_backends():
    require_tools("ip")
    require(os.geteuid() == 0, "needs root for a network namespace")
    backends = NetnsBackends(2).start()
    yield backends
    backends.stop()


@pytest.fixture
def kokoa(workdir):
    if not (REPO / "kokoa.py").exists():
        require(False, "kokoa.py is not there yet")
    directory = workdir / "kokoa"
    directory.mkdir()
    server = KokoaServer(directory).start()
    yield server
    server.stop()


def test_end_to_end_with_real_control_plane(kokoa, netns_backends, workdir):
    require_tools("nginx", "curl", "jq", "flock", "openssl")
    status, _, origin = kokoa.request("POST", "/api/v1/origins",
                                      {"name": "home", "wg_ip": netns_backends.address})
    assert status == 201, origin
    route_ids = {}
    for host, port in zip(("a.example.com", "b.example.com"), netns_backends.ports, strict=True):
        status, _, route = kokoa.request("POST", "/api/v1/routes", {
            "hostname": host, "origin_id": origin["id"], "target_port": port})
        assert status == 201, route
        route_ids[host] = route["id"]
    edge_id, token = kokoa.register_edge("edge-e2e")
    edge = Edge(workdir / "edge", kokoa.url, token=token)
    edge.root.chmod(0o755)
    edge.nginx.start()
    try:
        edge.once()
        assert edge.get("a.example.com", "/whoami") == (200, "backend0")
        assert edge.get("b.example.com", "/whoami", tls=True) == (200, "backend1")
        _, _, listing = kokoa.request("GET", "/api/v1/edge-nodes")
        node = next(n for n in listing["edge_nodes"] if n["id"] == edge_id)
        assert node["in_sync"] is True and node["certificates"] == {
            "a.example.com": {"status": "pending"}, "b.example.com": {"status": "pending"}}
        before = edge.snapshot()
        proc = edge.once()
        assert "config unchanged" in proc.stdout and edge.snapshot() == before
        status, _, _ = kokoa.request("DELETE", f"/api/v1/routes/{route_ids['b.example.com']}")
        assert status == 204
        edge.once()
        assert edge.server_files() == ["a.example.com.conf"]
        assert edge.get("b.example.com")[0] == 404
        assert edge.get("a.example.com", "/whoami") == (200, "backend0")
        status, _, _ = kokoa.request("DELETE", f"/api/v1/edge-nodes/{edge_id}")
        assert status == 204
        proc = edge.once(rc=1)
        assert "HTTP 401" in proc.stderr and edge.server_files() == ["a.example.com.conf"]
    finally:
        edge.nginx.stop()


def test_install_edge_makes_the_wireguard_key_pair_and_registers_it(kokoa, workdir):
    require_tools("jq", "curl", "openssl", "wg", "flock")
    root = workdir / "root"
    (root / "etc/nginx").mkdir(parents=True)
    (root / "etc/nginx/nginx.conf").write_text("events {}\nhttp {\n}\n")
    env = {"PATH": os.environ["PATH"], "KOKOA_BOOTSTRAP_TOKEN": kokoa.bootstrap_token}
    result = subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--no-packages", "--no-run",
         "--control-plane", kokoa.url, "--email", "ops@example.com", "--name", "edge-wg",
         "--wg-ip", "10.99.0.1", "--wg-endpoint", "edge-wg.example.com:51820"],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    wg_dir = root / "etc/wireguard"
    assert (wg_dir / "kokoa0.key").stat().st_mode & 0o077 == 0
    conf = (wg_dir / "kokoa0.conf").read_text()
    assert (wg_dir / "kokoa0.conf").stat().st_mode & 0o077 == 0
    assert "Address = 10.99.0.1" in conf and "ListenPort = 51820" in conf
    private = (wg_dir / "kokoa0.key").read_text().strip()
    assert f"PrivateKey = {private}" in conf
    _, _, listing = kokoa.request("GET", "/api/v1/edge-nodes")
    node = next(n for n in listing["edge_nodes"] if n["name"] == "edge-wg")
    assert node["wg_public_key"] == (wg_dir / "kokoa0.pub").read_text().strip()
    assert node["wg_ip"] == "10.99.0.1" and node["wg_endpoint"] == "edge-wg.example.com:51820"
    assert private not in json.dumps(listing)


def test_install_edge_without_wg_ip_gets_an_address_and_the_tunnel_network(workdir):
    require_tools("jq", "curl", "openssl", "wg", "flock")
    (workdir / "kokoa").mkdir()
    server = KokoaServer(workdir / "kokoa", {"KOKOA_WG_NETWORK": "10.77.0.0/24"}).start()
    try:
        assert server.request("POST", "/api/v1/origins", {"name": "home"})[2]["wg_ip"] == \
            "10.77.0.1"
        root = workdir / "root"
        (root / "etc/nginx").mkdir(parents=True)
        (root / "etc/nginx/nginx.conf").write_text("events {}\nhttp {\n}\n")
        env = {"PATH": os.environ["PATH"], "KOKOA_BOOTSTRAP_TOKEN": server.bootstrap_token}
        command = ["bash", str(INSTALL), "--root", str(root), "--no-packages", "--no-run",
                   "--control-plane", server.url, "--email", "ops@example.com", "--name", "e1"]
        for _ in range(2):          # a re-run keeps the address and the network
            result = subprocess.run(command, env=env, capture_output=True, text=True,
                                    timeout=120)
            assert result.returncode == 0, result.stdout + result.stderr
            conf = (root / "etc/wireguard/kokoa0.conf").read_text()
            assert "Address = 10.77.0.2\n" in conf
            settings = (root / "etc/kokoa/edge.env").read_text()
            assert "WG_NETWORK=10.77.0.0/24\n" in settings
        listing = server.request("GET", "/api/v1/edge-nodes")[2]["edge_nodes"]
        assert [(n["name"], n["wg_ip"]) for n in listing] == [("e1", "10.77.0.2")]
    finally:
        server.stop()


def tree(root):
    """Every path under root with its mode, and content hash and mtime for files (not the
    lock, nor the health measurements: traffic between two runs changes them)."""
    result = {}
    for path in sorted(Path(root).rglob("*")):
        if path.name == "agent.lock" or path.is_relative_to(Path(root) / "nginx") \
                or path.is_relative_to(Path(root) / "var/lib/kokoa-edge/health"):
            continue
        st = path.lstat()
        entry = (oct(st.st_mode),)
        if path.is_file():
            entry += (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns)
        result[str(path.relative_to(root))] = entry
    return result


def test_install_edge_twice_gives_the_same_tree(kokoa, netns_backends, workdir):
    require_tools("nginx", "curl", "jq", "flock", "openssl", "wg")
    status, _, origin = kokoa.request("POST", "/api/v1/origins",
                                      {"name": "home", "wg_ip": netns_backends.address})
    assert status == 201
    status, _, _ = kokoa.request("POST", "/api/v1/routes", {
        "hostname": "a.example.com", "origin_id": origin["id"],
        "target_port": netns_backends.ports[0]})
    assert status == 201
    root = workdir / "root"
    root.mkdir()
    root.chmod(0o755)
    edge = Edge(root, kokoa.url)
    edge.nginx = Nginx(root / "nginx", root / "etc/nginx/kokoa",
                       conf_path=root / "etc/nginx/nginx.conf")
    edge.nginx.start()
    env = {"PATH": edge.env["PATH"], "NGINX_BIN": str(edge.nginx.wrapper),
           "HTTP_PORT": edge.env["HTTP_PORT"], "HTTPS_PORT": edge.env["HTTPS_PORT"],
           "LISTEN_ADDRESSES": "127.0.0.1", "CERTBOT_BIN": "/bin/false",
           "WG_INTERFACE": "none", "KOKOA_BOOTSTRAP_TOKEN": kokoa.bootstrap_token}
    args = ["bash", str(INSTALL), "--root", str(root), "--no-packages",
            "--control-plane", kokoa.url, "--email", "ops@example.com", "--name", "edge-inst",
            "--wg-ip", "10.99.0.1"]
    try:
        first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stdout + first.stderr
        edge.nginx.wait_reloaded(set())
        assert edge.get("a.example.com", "/whoami") == (200, "backend0")
        env_file = root / "etc/kokoa/edge.env"
        assert oct(env_file.stat().st_mode & 0o777) == "0o600"
        settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                        if line and not line.startswith("#"))
        assert len(settings["NODE_TOKEN"]) >= 32
        assert kokoa.bootstrap_token not in env_file.read_text()
        assert (root / "etc/nginx/nginx.conf").read_text().count("kokoa/servers/*.conf;") == 1
        assert (root / "usr/local/bin/kokoa-edge-agent").read_bytes() == AGENT.read_bytes()
        assert not (root / "etc/wireguard").exists()      # WG_INTERFACE=none
        before = tree(root)
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "nothing to change" in second.stdout
        assert tree(root) == before
    finally:
        edge.nginx.stop()


@pytest.mark.parametrize("stock", [True, False])
def test_install_edge_only_switches_off_the_stock_default_site(kokoa, workdir, stock):
    require_tools("jq", "curl", "openssl", "flock", "dpkg-query")
    stock_site = Path("/etc/nginx/sites-available/default")
    require(stock_site.is_file(), "Debian's nginx default site is not installed")
    root = workdir / "root"
    (root / "etc/nginx/sites-available").mkdir(parents=True)
    (root / "etc/nginx/sites-enabled").mkdir()
    (root / "etc/nginx/nginx.conf").write_text("events {}\nhttp {\n}\n")
    site = root / "etc/nginx/sites-available/default"
    site.write_bytes(stock_site.read_bytes() if stock else
                     b"server { listen 80 default_server; root /srv/shop; }\n")
    link = root / "etc/nginx/sites-enabled/default"
    link.symlink_to("../sites-available/default")
    env = {"PATH": os.environ["PATH"], "KOKOA_BOOTSTRAP_TOKEN": kokoa.bootstrap_token,
           "WG_INTERFACE": "none"}
    result = subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--no-packages", "--no-run", "--init",
         "cron", "--control-plane", kokoa.url, "--email", "ops@example.com",
         "--name", f"edge-site-{stock}"], env=env, capture_output=True, text=True, timeout=120)
    if stock:
        assert result.returncode == 0, result.stdout + result.stderr
        assert not link.exists()
    else:
        assert result.returncode == 1 and "not Debian's stock site" in result.stderr
        assert link.is_symlink() and site.read_text().startswith("server { listen 80")


def test_install_edge_refuses_an_nginx_conf_that_sets_the_hash_sizes(kokoa, workdir):
    require_tools("jq", "curl", "openssl", "flock")
    root = workdir / "root"
    (root / "etc/nginx").mkdir(parents=True)
    conf = "events {}\nhttp {\n    server_names_hash_bucket_size 64;\n}\n"
    (root / "etc/nginx/nginx.conf").write_text(conf)
    result = subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--no-packages", "--no-run", "--init",
         "cron", "--control-plane", kokoa.url, "--email", "ops@example.com"],
        env={"PATH": os.environ["PATH"], "KOKOA_BOOTSTRAP_TOKEN": kokoa.bootstrap_token,
             "WG_INTERFACE": "none"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "hash sizes" in result.stderr
    assert (root / "etc/nginx/nginx.conf").read_text() == conf
    assert list(root.iterdir()) == [root / "etc"]           # nothing installed
    _, _, listing = kokoa.request("GET", "/api/v1/edge-nodes")
    assert listing["edge_nodes"] == []                      # nothing registered


def test_install_edge_rerun_turns_staging_on_and_off_and_says_so(kokoa, workdir):
    require_tools("jq", "curl", "openssl", "flock")
    root = workdir / "root"
    (root / "etc/nginx").mkdir(parents=True)
    (root / "etc/nginx/nginx.conf").write_text("events {}\nhttp {\n}\n")
    env = {"PATH": os.environ["PATH"], "KOKOA_BOOTSTRAP_TOKEN": kokoa.bootstrap_token,
           "WG_INTERFACE": "none"}
    args = ["bash", str(INSTALL), "--root", str(root), "--no-packages", "--no-run", "--init",
            "cron", "--control-plane", kokoa.url, "--email", "ops@example.com",
            "--name", "edge-staging"]
    env_file = root / "etc/kokoa/edge.env"
    outputs = []
    for extra in ([], ["--staging"], [], []):
        result = subprocess.run(args + extra, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        outputs.append((result.stdout + result.stderr, "ACME_STAGING=1" in env_file.read_text()))
    assert [staging for _, staging in outputs] == [False, True, False, False]
    assert "wrote the agent settings" in outputs[1][0] and "done: 1 change(s)" in outputs[1][0]
    assert "wrote the agent settings" in outputs[2][0]
    assert "nothing to change" in outputs[3][0]
