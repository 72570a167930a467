"""Real applications' traffic through the real edge (issue 13): big uploads and downloads,
resumes, the headers an origin sees, what the edge says about itself, server-sent events,
WebSockets, compression, HTTP/2 bursts, the TLS a grader sees, and route options.

One World for the module (netlab.py: control plane, an edge namespace with nginx, pebble and
agent.sh, WireGuard to origin namespaces, a client namespace); a WorkloadOrigin and an nginx
file server serve on origin A's tunnel address. Every request comes from the client
namespace, through the edge's nginx (a pebble certificate) and the tunnel. Nothing else is
touched; every process and namespace goes away at the end, also on failure.
"""

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import require_root, require_tools, wait_until
from netlab import TOOLS, WorkloadOrigin, built_world, upload_speed, write_random_file

HOST = "apps.example.test"              # routed to the workload origin, real certificate
NOCERT = "nocert.example.test"          # same origin, its certificate cannot be had
FILES = "files.example.test"            # the nginx file server on origin A
ORIGIN_PORT = 8090
FILES_PORT = 8092
UPLOAD_BYTES = 100 * 1024 * 1024
DOWNLOAD_BYTES = 500 * 1024 * 1024
FIRST_PART = 8 * 1024 * 1024            # what a piped upload sends before it pauses
WEBSOCKET_CLIENT = r"""
import json, os, socket, ssl, sys, time
from websockets.sync.client import connect
host, address, cafile, count, idle = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:6])
context = ssl.create_default_context(cafile=cafile)
sock = socket.create_connection((address, 443), timeout=10)
sock.settimeout(None)
echoed = 0
with connect(f"wss://{host}/ws", sock=sock, ssl=context, server_hostname=host,
             ping_interval=None, open_timeout=10, close_timeout=5, max_size=1 << 20) as ws:
    for number in range(count):
        message = os.urandom(65536) if number % 100 == 99 else f"{number}:" + "x" * (number % 700)
        ws.send(message)
        if ws.recv(timeout=10) == message:
            echoed += 1
    time.sleep(idle)                     # no pings: the connection really is idle
    ws.send("after the pause")
    after = ws.recv(timeout=10)
print(json.dumps({"echoed": echoed, "after_idle": after}))
"""


@pytest.fixture(scope="module")
def world():
    require_root()
    require_tools(*TOOLS)
    with built_world("kokoa-workloads-") as world:
        yield world


@pytest.fixture(scope="module")
def origin(world):
    """The workload origin on origin A, HOST routed to it with a real certificate, NOCERT
    routed to it on the fallback certificate (its certbot fails)."""
    backend = WorkloadOrigin(world.lab, "origin-a", "10.8.0.2", ORIGIN_PORT, world.dir)
    try:
        backend.start()
        world.route(HOST, world.origin_a, ORIGIN_PORT)
        first = world.agent_once()
        assert f"certificate for {HOST} obtained" in first.stdout, first.stdout
        wait_until(lambda: curl(world, HOST, "/healthz", "-f").returncode == 0, timeout=40,
                   interval=0.5, what=f"{HOST} to answer through the tunnel")
        world.route(NOCERT, world.origin_a, ORIGIN_PORT)
        normal_env = world.agent_env
        world.agent_env = {**normal_env, "CERTBOT_BIN": "false"}
        try:
            world.agent_once()
        finally:
            world.agent_env = normal_env
        yield backend
    finally:
        backend.stop()


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    """A file of UPLOAD_BYTES random bytes and its SHA-256."""
    path = tmp_path_factory.mktemp("payload") / "upload.bin"
    yield path, write_random_file(path, UPLOAD_BYTES)
    path.unlink()


def curl(world, host, path, *args, scheme="https", timeout=120):
    """curl scheme://host/path from the client namespace through the edge."""
    port = 443 if scheme == "https" else 80
    return world.lab.run(
        "client", "curl", "-sS", "--max-time", str(timeout - 10),
        "--cacert", str(world.pebble.root),
        "--resolve", f"{host}:{port}:{world.lab.address('edge')}",
        *args, f"{scheme}://{host}{path}", check=False, timeout=timeout)


def fetch(world, host, path, *args, scheme="https"):
    """(status, {lower-case header name: [values]}, body bytes) of one request via curl."""
    with tempfile.TemporaryDirectory() as scratch:
        head, body = Path(scratch) / "head", Path(scratch) / "body"
        result = curl(world, host, path, "-D", str(head), "-o", str(body), *args,
                      scheme=scheme)
        assert result.returncode == 0, result.stderr
        blocks = head.read_text().replace("\r\n", "\n").strip().split("\n\n")
        status_line, *lines = blocks[-1].splitlines()   # the last: after any 100 Continue
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        return int(status_line.split()[1]), headers, body.read_bytes()


class SpoolWatch:
    """What sits under the edge nginx's client body temp directory, sampled every 20 ms while
    the with-block runs: files there, and files there that a worker holds open (nginx unlinks
    its temp files as it creates them, so an open descriptor is how a spooled body shows)."""

    MAX_SAMPLES = 30000                     # 10 minutes at 20 ms

    def __init__(self, nginx):
        self.nginx = nginx
        self.dir = str(nginx.prefix / "tmp/body")
        self.seen = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self):
        found = {str(p) for p in Path(self.dir).rglob("*")}
        for pid in self.nginx.workers():
            try:
                descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
            except OSError:
                continue                    # a worker that just exited
            for fd in descriptors:
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith(self.dir):
                    found.add(target)
        return found

    def _run(self):
        while not self._stop.is_set() and self.samples < self.MAX_SAMPLES:
            self.seen |= self.sample()
            self.samples += 1
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


@pytest.mark.parametrize("http_version", ["--http1.1", "--http2"])
def test_a_100_mib_upload_with_content_length_reaches_the_origin_intact_and_unspooled(
        world, origin, payload, http_version):
    path, sha256 = payload
    with SpoolWatch(world.nginx) as spool:
        result = curl(world, HOST, f"/upload?id=put{http_version}", http_version,
                      "-T", str(path), "-w", "\n%{speed_upload}")
    answer, through_edge = upload_speed(result)
    assert (answer["sha256"], answer["bytes"]) == (sha256, UPLOAD_BYTES)
    assert spool.samples > 1 and spool.seen == set()
    assert spool.sample() == set()
    direct = world.lab.run("edge", "curl", "-sS", "--max-time", "110", "-T", str(path),
                           "-w", "\n%{speed_upload}", f"{origin.url}/upload?id=direct",
                           check=False, timeout=120)
    answer, over_tunnel = upload_speed(direct)
    assert answer["sha256"] == sha256
    print(f"\n{http_version} upload: {through_edge:.1f} MiB/s client -> edge -> origin, "
          f"{over_tunnel:.1f} MiB/s edge -> origin directly over the tunnel")


def test_a_chunked_upload_streams_to_the_origin_while_the_client_still_sends(
        world, origin, payload):
    path, sha256 = payload
    upload_id = "chunked-" + os.urandom(4).hex()

    def origin_received():
        return json.loads(origin.get(f"/progress?id={upload_id}").stdout)["bytes"]

    client = subprocess.Popen(world.lab.exec_args(
        "client", "curl", "-sS", "--max-time", "110", "--http1.1",
        "--cacert", str(world.pebble.root),
        "--resolve", f"{HOST}:443:{world.lab.address('edge')}",
        "-T", "-", "-H", "Transfer-Encoding: chunked", f"https://{HOST}/upload?id={upload_id}"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with SpoolWatch(world.nginx) as spool, path.open("rb") as source:
            client.stdin.write(source.read(FIRST_PART))
            client.stdin.flush()
            # The client holds the rest back: the origin must already have some of the body.
            wait_until(origin_received, timeout=20, interval=0.1,
                       what="the origin to receive the first part of the upload")
            shutil.copyfileobj(source, client.stdin, 1 << 20)
            out, err = client.communicate(timeout=120)     # closes stdin: the body ends
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=10)
    assert client.returncode == 0, err
    answer = json.loads(out)
    assert (answer["sha256"], answer["bytes"], answer["chunked"]) == (sha256, UPLOAD_BYTES, True)
    assert spool.samples > 1 and spool.seen == set()
    assert spool.sample() == set()


def test_the_origin_sees_the_edges_forwarding_headers_not_the_clients(world, origin):
    spoofed = {"X-Forwarded-Host": "evil.example", "X-Forwarded-For": "203.0.113.66",
               "X-Real-IP": "203.0.113.66", "X-Forwarded-Proto": "http",
               "X-Forwarded-Port": "8443",
               "Forwarded": "for=203.0.113.66;host=evil.example;proto=http"}
    args = [arg for name, value in spoofed.items() for arg in ("-H", f"{name}: {value}")]
    result = curl(world, HOST, "/headers", "-f", *args)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    headers = {}
    for name, value in seen["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    client_ip = world.lab.address("client")
    assert headers["host"] == [HOST]
    assert headers["x-forwarded-host"] == [HOST]
    assert headers["x-forwarded-port"] == ["443"]
    assert headers["x-forwarded-proto"] == ["https"]
    assert headers["x-forwarded-for"] == [client_ip]
    assert headers["x-real-ip"] == [client_ip]
    assert "forwarded" not in headers
    assert seen["peer"] == "10.8.0.1"               # it came through the edge's tunnel


def test_the_edge_hides_its_version_and_sends_hsts_with_the_real_certificate(world, origin):
    status, headers, _ = fetch(world, HOST, "/healthz")
    assert status == 200
    assert headers["server"] == ["nginx"]
    assert headers["strict-transport-security"] == ["max-age=31536000"]
    status, headers, _ = fetch(world, HOST, "/healthz", scheme="http")
    assert status == 301
    assert headers["server"] == ["nginx"]


def test_a_host_on_the_fallback_certificate_gets_no_hsts(world, origin):
    untrusted = curl(world, NOCERT, "/healthz")
    assert untrusted.returncode == 60, untrusted.stderr     # not a pebble certificate
    status, headers, _ = fetch(world, NOCERT, "/healthz", "--insecure")
    assert status == 200
    assert headers["server"] == ["nginx"]
    assert "strict-transport-security" not in headers


def stream_lines(world, host, path, *args, limit=15):
    """Run curl -N on host+path from the client namespace; yield (seconds since start, line)
    of the response (headers included) as each line arrives, for at most `limit` seconds."""
    started = time.monotonic()
    client = subprocess.Popen(world.lab.exec_args(
        "client", "curl", "-sS", "-N", "-i", "--max-time", str(limit),
        "--cacert", str(world.pebble.root), "--resolve", f"{host}:443:{world.lab.address('edge')}",
        *args, f"https://{host}{path}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in client.stdout:
            yield time.monotonic() - started, line.decode("latin-1").rstrip("\r\n")
        assert client.wait(timeout=10) == 0, client.stderr.read()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=10)


@pytest.mark.parametrize("http_version", ["--http1.1", "--http2"])
def test_server_sent_events_reach_the_client_as_the_origin_sends_them(world, origin,
                                                                      http_version):
    lines = list(stream_lines(world, HOST, "/sse", http_version))
    status = lines[0][1]
    assert status.startswith("HTTP/1.1 200" if http_version == "--http1.1" else "HTTP/2 200")
    assert "content-type: text/event-stream" in [line.lower() for _, line in lines]
    arrivals = {line: at for at, line in lines if line.startswith("data: ")}
    assert list(arrivals) == ["data: 1", "data: 2", "data: 3", "data: 4"]
    assert arrivals["data: 1"] < 0.5, arrivals
    assert arrivals["data: 4"] - arrivals["data: 1"] >= 2.5   # each came as it was sent
    print(f"\n{http_version}: first event after {arrivals['data: 1']:.3f} s, the last after "
          f"{arrivals['data: 4']:.2f} s")


def test_json_the_origin_left_uncompressed_arrives_gzipped_with_vary(world, origin):
    direct = origin.get("/json", from_host="edge")
    assert direct.returncode == 0, direct.stderr
    document = direct.stdout.encode()
    assert len(document) > 20000
    status, headers, body = fetch(world, HOST, "/json", "-H", "Accept-Encoding: gzip")
    assert status == 200
    assert headers["content-encoding"] == ["gzip"]
    assert "accept-encoding" in ",".join(headers.get("vary", [])).lower()
    assert gzip.decompress(body) == document
    assert len(body) < len(document) // 4
    status, headers, body = fetch(world, HOST, "/json")
    assert status == 200
    assert "content-encoding" not in headers and body == document


@pytest.fixture(scope="module")
def files(world, origin):
    """FILES routed to an nginx file server on origin A holding big.bin (DOWNLOAD_BYTES of
    random data) and small.txt: (path of big.bin, its SHA-256, the file server)."""
    docroot = world.dir / "files-docroot"
    docroot.mkdir()
    big = docroot / "big.bin"
    sha256 = write_random_file(big, DOWNLOAD_BYTES)
    big.chmod(0o644)
    (docroot / "small.txt").write_text("small file\n")
    server = world.static_origin("nginx-files", "origin-a", "10.8.0.2", FILES_PORT, docroot)
    world.route(FILES, world.origin_a, FILES_PORT)
    run = world.agent_once()
    assert f"certificate for {FILES} obtained" in run.stdout, run.stdout
    wait_until(lambda: curl(world, FILES, "/small.txt", "-f").returncode == 0, timeout=40,
               interval=0.5, what=f"{FILES} to answer")
    yield big, sha256, server
    big.unlink()


def sha256_of(path, start=0, length=None):
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        source.seek(start)
        left = os.path.getsize(path) - start if length is None else length
        while left:
            piece = source.read(min(left, 1 << 20))
            digest.update(piece)
            left -= len(piece)
    return digest.hexdigest()


def download(world, *args):
    """(HTTP status, bytes/s) of a curl download from the client namespace through the edge."""
    result = curl(world, FILES, "/big.bin", *args, "-w", "%{http_code} %{speed_download}")
    assert result.returncode == 0, result.stderr
    status, speed = result.stdout.split()
    return int(status), float(speed)


def test_a_500_mib_download_and_its_ranges_and_resume_arrive_intact(world, files, tmp_path):
    big, sha256, _ = files
    whole = tmp_path / "whole.bin"
    status, through_edge = download(world, "-o", str(whole))
    assert status == 200 and sha256_of(whole) == sha256
    whole.unlink()
    direct = world.lab.run("edge", "curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download}",
                           f"http://10.8.0.2:{FILES_PORT}/big.bin", timeout=120)
    over_tunnel = float(direct.stdout)

    middle = tmp_path / "middle.bin"
    start, length = 100 << 20, 100 << 20
    status, _ = download(world, "-r", f"{start}-{start + length - 1}", "-o", str(middle))
    assert status == 206 and middle.stat().st_size == length
    assert sha256_of(middle) == sha256_of(big, start, length)

    resumed = tmp_path / "resumed.bin"          # a download cut off at an odd byte, resumed
    status, _ = download(world, "-r", "0-123456788", "-o", str(resumed))
    assert status == 206 and resumed.stat().st_size == 123456789
    status, _ = download(world, "-C", "-", "-o", str(resumed))
    assert status == 206 and sha256_of(resumed) == sha256
    print(f"\n500 MiB download: {through_edge / (1 << 20):.1f} MiB/s client -> edge -> origin, "
          f"{over_tunnel / (1 << 20):.1f} MiB/s edge -> origin directly over the tunnel "
          f"({through_edge / over_tunnel:.2f}x)")


def test_a_websocket_echoes_1000_messages_and_survives_70_s_of_silence(world, origin):
    result = world.lab.run("client", sys.executable, "-c", WEBSOCKET_CLIENT, HOST,
                           world.lab.address("edge"), str(world.pebble.root), "1000", "70",
                           check=False, timeout=150)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"echoed": 1000, "after_idle": "after the pause"}


def h2load(world, url, *args):
    """h2load's summary figures from the client namespace: {'succeeded': n, 'failed': n, ...}
    and the status code counts."""
    result = world.lab.run("client", "h2load", *args, url, check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    totals = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored, (\d+) timeout", result.stdout)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx",
                      result.stdout)
    assert totals and codes, result.stdout
    names = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    return ({name: int(n) for name, n in zip(names, totals.groups(), strict=True)}
            | {f"{kind}": int(n) for kind, n in zip(("2xx", "3xx", "4xx", "5xx"),
                                                     codes.groups(), strict=True)})


def test_http2_bursts_all_succeed_and_reuse_the_tunnel_connections(world, files):
    world.client_resolves(HOST, FILES)
    figures = h2load(world, f"https://{HOST}/healthz", "-n", "2000", "-c", "20", "-m", "10")
    assert figures["succeeded"] == 2000 and figures["2xx"] == 2000, figures
    assert figures["failed"] == figures["errored"] == figures["timeout"] == 0, figures
    # 100 streams at once (two clients, 50 each; nginx ends an HTTP/2 connection after 1,000
    # requests): the edge opens up to 100 upstream connections, and keeps them for the next
    # burst rather than closing all but a few.
    burst = ("-n", "1800", "-c", "2", "-m", "50")
    h2load(world, f"https://{FILES}/small.txt", *burst)
    before = world.accepted_connections("10.8.0.2", FILES_PORT)
    figures = h2load(world, f"https://{FILES}/small.txt", *burst)
    opened = world.accepted_connections("10.8.0.2", FILES_PORT) - before - 1  # minus its own
    assert figures["succeeded"] == 1800 and figures["2xx"] == 1800, figures
    print(f"\n1800 requests, 100 at a time over HTTP/2: {opened} new upstream connections")
    assert opened <= 50, f"{opened} new tunnel connections for 1800 requests"


# testssl.sh findings rated MEDIUM or worse that are excused, each by name with its reason;
# any other fails the test. First those from pebble's test CA, which the edge cannot change
# (a Let's Encrypt certificate lives 90 days or less and names its CRL):
PEBBLE_FINDINGS = {
    "cert_validityPeriod": "pebble issues certificates valid for 5 years",
    "cert_revocation": "pebble's certificates name no CRL and no OCSP responder",
}
# Then one the edge does control, on purpose: testssl rates any HTTP compression "potentially
# vulnerable" to BREACH. Compressing what the origin left uncompressed is what the edge is
# asked to do (the README says so and why); BREACH needs a secret and attacker-controlled text
# in one compressed response, which apps defeat (masked CSRF tokens, SameSite cookies).
DELIBERATE_FINDINGS = {
    "BREACH": "the edge gzips text the origin left uncompressed",
}


def test_testssl_finds_nothing_medium_or_worse_that_the_edge_controls(world, origin, tmp_path):
    report = tmp_path / "testssl.json"
    result = world.lab.run(
        "client", "testssl", "--quiet", "--color", "0", "--warnings", "off",
        "--connect-timeout", "10", "--openssl-timeout", "10",
        "--ip", world.lab.address("edge"), "--add-ca", str(world.pebble.root),
        "--jsonfile", str(report), f"https://{HOST}/",
        check=False, timeout=600)
    assert report.exists(), result.stdout + result.stderr
    findings = json.loads(report.read_text())
    serious = {f["id"]: f"{f['severity']}: {f['finding']}" for f in findings
               if f["severity"] in ("MEDIUM", "HIGH", "CRITICAL")}
    print("\ntestssl.sh, MEDIUM or worse:", json.dumps(serious, indent=1))
    assert serious.keys() - PEBBLE_FINDINGS.keys() - DELIBERATE_FINDINGS.keys() == set(), serious
    graded = {f["id"]: f["finding"] for f in findings}
    assert graded["cipher_order"] == "server"
    assert graded["HSTS_time"].startswith("365 days")
    assert graded["X-Content-Type-Options"] == "nosniff"
    for protocol in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert graded[protocol] == "not offered", protocol
    assert graded["TLS1_2"] == "offered" and graded["TLS1_3"].startswith("offered")


def test_route_options_hold_on_the_real_edge_a_body_limit_and_a_disabled_route(
        world, origin, tmp_path):
    limited = "limited.example.test"
    route = world.route(limited, world.origin_a, ORIGIN_PORT)
    status, _, _ = world.kokoa.request("PATCH", f"/api/v1/routes/{route['id']}",
                                       {"max_body_size": 5})
    assert status == 200
    assert f"certificate for {limited} obtained" in world.agent_once().stdout
    body = tmp_path / "body.bin"
    for size, expected in ((5 << 20, 200), ((6 << 20), 413)):
        body.write_bytes(os.urandom(size))
        result = curl(world, limited, "/upload", "-o", "/dev/null", "-w", "%{http_code}",
                      "-T", str(body))
        assert result.returncode == 0 and result.stdout == str(expected), (size, result)

    status, _, _ = world.kokoa.request("PATCH", f"/api/v1/routes/{route['id']}",
                                       {"enabled": False})
    assert status == 200
    world.agent_once()
    refused = curl(world, limited, "/healthz")       # no certificate for an unknown name
    assert refused.returncode == 35, (refused.returncode, refused.stdout, refused.stderr)
    assert curl(world, limited, "/healthz", "-o", "/dev/null", "-w", "%{http_code}",
                scheme="http").stdout == "404"
    assert limited not in (Path(world.agent_env["CONFIG_DIR"]) / "map.conf").read_text()


def test_an_access_policy_from_the_control_plane_protects_the_route_on_the_real_edge(
        world, origin):
    """Issue 14 end to end: the policy made in the API, the edge's agent enforcing it for a
    client in its own namespace, and an edge whose agent knows only schema 1 dropping it."""
    locked = "locked.example.test"
    password = "a family password " + os.urandom(4).hex()
    status, _, policy = world.kokoa.request("POST", "/api/v1/access-policies", {
        "name": "family", "users": [{"username": "alice", "password": password}]})
    assert status == 201, policy
    route = world.route(locked, world.origin_a, ORIGIN_PORT)
    status, _, _ = world.kokoa.request("PATCH", f"/api/v1/routes/{route['id']}",
                                       {"access_policy_id": policy["id"]})
    assert status == 200
    assert f"certificate for {locked} obtained" in world.agent_once().stdout

    status, headers, _ = fetch(world, locked, "/headers")
    assert status == 401 and headers["www-authenticate"] == [f'Basic realm="{locked}"']
    status, _, _ = fetch(world, locked, "/headers", "-u", "alice:wrong password")
    assert status == 401
    status, _, body = fetch(world, locked, "/headers", "-u", f"alice:{password}")
    assert status == 200
    seen = {name.lower() for name, _ in json.loads(body)["headers"]}
    assert "authorization" not in seen and "host" in seen

    client = world.lab.address("client")           # its own address: no password needed
    status, _, _ = world.kokoa.request("PATCH", f"/api/v1/access-policies/{policy['id']}",
                                       {"allow": [f"{client}/32"]})
    assert status == 200
    world.agent_once()
    assert fetch(world, locked, "/healthz")[0] == 200

    normal_env = world.agent_env                    # an agent that knows only schema 1
    world.agent_env = {**normal_env, "AGENT_SCHEMAS": "1"}
    try:
        world.agent_once()
        assert curl(world, locked, "/healthz").returncode == 35     # not served at all
        assert fetch(world, HOST, "/healthz")[0] == 200              # the rest still is
        _, _, edges = world.kokoa.request("GET", "/api/v1/edge-nodes")
        (edge,) = edges["edge_nodes"]
        assert edge["schema"] == 1
        assert [item["hostname"] for item in edge["unserved_routes"]] == [locked]
    finally:
        world.agent_env = normal_env
    world.agent_once()
    assert fetch(world, locked, "/healthz")[0] == 200
