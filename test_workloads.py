"""Real applications' traffic through the real edge (issue 13): big uploads, the headers an
origin sees, what the edge says about itself, server-sent events and compression.

One World for the module (netlab.py: control plane, an edge namespace with nginx, pebble and
agent.sh, WireGuard to origin namespaces, a client namespace); a WorkloadOrigin serves on
origin A's tunnel address. Every request comes from the client namespace, through the edge's
nginx (a pebble certificate) and the tunnel. Nothing else is touched; every process and
namespace goes away at the end, also on failure.
"""

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import require_root, require_tools, wait_until
from netlab import TOOLS, WorkloadOrigin, built_world

HOST = "apps.example.test"              # routed to the workload origin, real certificate
NOCERT = "nocert.example.test"          # same origin, its certificate cannot be had
ORIGIN_PORT = 8090
UPLOAD_BYTES = 100 * 1024 * 1024
FIRST_PART = 8 * 1024 * 1024            # what a piped upload sends before it pauses
SSE_CLIENT = r"""
import json, socket, ssl, sys, time
host, address, cafile = sys.argv[1:4]
context = ssl.create_default_context(cafile=cafile)
with socket.create_connection((address, 443), timeout=10) as raw:
    with context.wrap_socket(raw, server_hostname=host) as tls:
        start = time.monotonic()
        tls.sendall(f"GET /sse HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        received, first = b"", None
        while time.monotonic() < start + 15:
            chunk = tls.recv(65536)
            if not chunk:
                break
            received += chunk
            if first is None and b"data: 1" in received:
                first = time.monotonic() - start
print(json.dumps({"first": first, "total": time.monotonic() - start,
                  "response": received.decode("latin-1")}))
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
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(UPLOAD_BYTES // (1 << 20)):
            piece = os.urandom(1 << 20)
            digest.update(piece)
            out.write(piece)
    yield path, digest.hexdigest()
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


def upload_speed(result):
    """(origin's JSON answer, curl's upload speed in MiB/s) from a curl -w '\\n%{...}' run."""
    assert result.returncode == 0, result.stderr
    body, _, speed = result.stdout.rpartition("\n")
    return json.loads(body), float(speed) / (1 << 20)


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


def test_server_sent_events_reach_the_client_as_the_origin_sends_them(world, origin):
    result = world.lab.run("client", "python3", "-c", SSE_CLIENT, HOST,
                           world.lab.address("edge"), str(world.pebble.root), timeout=30)
    timing = json.loads(result.stdout)
    head, _, events = timing["response"].partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")
    assert "content-type: text/event-stream" in head.lower()
    assert "data: 4" in events
    assert timing["total"] >= 2.5                   # the origin held the response open
    assert timing["first"] is not None and timing["first"] < 0.5, timing
    print(f"\nfirst event after {timing['first']:.3f} s, response over after "
          f"{timing['total']:.2f} s")


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
