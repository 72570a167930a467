"""The whole system end to end, in network namespaces this test creates.

control plane (this namespace, loopback) -- forwarded into --> edge namespace: nginx, agent.sh,
pebble (the ACME CA), wireguard-go; origin-a (reachable, has an endpoint) and origin-b (behind
a NAT-like firewall: only it can dial out) over WireGuard; a client namespace does the requests.
Underlay 198.18.0.0/24 on a bridge; overlay 10.8.0.0/24 inside the tunnels. Nothing else is
touched; every process and namespace goes away at the end, also on failure.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, KokoaServer, require_root, require_tools, wait_until
from netlab import NetLab, Nginx, Pebble, wg_keypair

AGENT = REPO / "agent.sh"
TOOLS = ("ip", "wireguard-go", "wg", "wg-quick", "nginx", "certbot", "pebble",
         "pebble-challtestsrv", "jq", "curl", "flock", "openssl", "nft")
NAT_RULES = """table inet natsim {{
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{underlay}" ct state new drop
    }}
}}
"""


class World:
    """Everything the journey needs, built in order; close() takes it all down."""

    def __init__(self, workdir):
        self.dir = workdir
        self.lab = NetLab()
        self.kokoa = KokoaServer(workdir / "cp")
        self.nginx = None
        self.pebble = None
        self.edge_if = f"{self.lab.tag}e"

    def build(self):
        (self.dir / "cp").mkdir()
        self.kokoa.start()
        for index, name in enumerate(("edge", "origin-a", "origin-b", "client"), start=1):
            self.lab.add_host(name, index)
        self._edge_wireguard()
        self.origin_a = self._origin("origin-a", "10.8.0.2", endpoint=True)
        self.origin_b = self._origin("origin-b", "10.8.0.3", endpoint=False)
        self.lab.run("origin-b", "nft", "-f", "-",
                     input=NAT_RULES.format(underlay=self.lab.underlay_ifname("origin-b")))
        self._service("origin-a", "10.8.0.2", 8080, "hello from origin A")
        self._service("origin-a", "10.8.0.2", 8082, "origin A on port 8082")
        self._service("origin-b", "10.8.0.3", 8081, "hello from origin B behind NAT")
        self._edge_nginx_and_pebble()
        return self

    def _edge_wireguard(self):
        private, public = wg_keypair()
        self.lab.wireguard("edge", self.edge_if, private, "10.8.0.1/32")
        self.edge_id, self.token = self.kokoa.register_edge(
            "edge1", wg_ip="10.8.0.1", wg_public_key=public,
            wg_endpoint=f"{self.lab.address('edge')}:51820")

    def _origin(self, name, wg_ip, endpoint):
        """Create the origin in the API, install its wireguard.conf with install-origin.sh."""
        body = {"name": name, "wg_ip": wg_ip}
        if endpoint:
            body["wg_endpoint"] = f"{self.lab.address(name)}:51820"
        status, _, origin = self.kokoa.request("POST", "/api/v1/origins", body)
        assert status == 201, origin
        root = self.dir / name
        result = subprocess.run(
            ["bash", str(REPO / "install-origin.sh"), "--control-plane", self.kokoa.url,
             "--origin-id", origin["id"], "--root", str(root), "--no-packages"],
            env={**os.environ, "KOKOA_ADMIN_PASSWORD": self.kokoa.admin_password},
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        conf = root / "etc/wireguard/kokoa0.conf"
        stripped = subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True,
                                  text=True, timeout=30, check=True).stdout
        ifname = f"{self.lab.tag}{name[-1]}"
        private = next(line.split(" = ", 1)[1] for line in stripped.splitlines()
                       if line.startswith("PrivateKey"))
        self.lab.wireguard(name, ifname, private, f"{wg_ip}/32")
        self.lab.run(name, "wg", "setconf", ifname, "/dev/stdin", input=stripped)
        self.lab.run(name, "ip", "route", "add", "10.8.0.1/32", "dev", ifname)
        return origin

    def _service(self, host, address, port, text):
        """A small HTTP service on the origin's WireGuard address."""
        docroot = Path(tempfile.mkdtemp(dir=self.dir))
        (docroot / "index.html").write_text(text + "\n")
        self.lab.start(host, "python3", "-m", "http.server", str(port), "--bind", address,
                       "--directory", str(docroot))
        wait_until(lambda: self.lab.run(host, "curl", "-s", "-o", "/dev/null",
                                        f"http://{address}:{port}/", check=False)
                   .returncode == 0, timeout=15, what=f"service {address}:{port}")

    def _edge_nginx_and_pebble(self):
        netns = self.lab.netns("edge")
        self.nginx = Nginx(self.dir / "nginx", self.dir / "nginx-kokoa", netns=netns).start()
        self.pebble = Pebble(self.dir, 80, netns=netns).start()
        cp_port = self.lab.forward_loopback("edge", self.kokoa.port)
        self.agent_env = {
            "PATH": os.environ["PATH"],
            "CONTROL_PLANE_URL": f"http://127.0.0.1:{cp_port}",
            "NODE_TOKEN": self.token,
            "CONFIG_DIR": str(self.dir / "nginx-kokoa"),
            "STATE_DIR": str(self.dir / "state"),
            "WEBROOT": str(self.dir / "webroot"),
            "LETSENCRYPT_DIR": str(self.dir / "letsencrypt"),
            "FALLBACK_CERT": str(self.dir / "fallback/fallback.crt"),
            "FALLBACK_KEY": str(self.dir / "fallback/fallback.key"),
            "NGINX_BIN": str(self.nginx.wrapper),
            "LISTEN_ADDRESSES": "0.0.0.0",
            "WG_INTERFACE": self.edge_if,
            "EMAIL": "ops@example.test",
            "ACME_SERVER": self.pebble.directory,
            "ACME_CA_BUNDLE": str(self.pebble.ca),
        }

    def agent_once(self, rc=0):
        """Run `agent.sh once` inside the edge; wait until a reload (if any) took effect."""
        old = self.nginx.workers()
        calls = len(self.nginx.calls())
        result = self.lab.run("edge", "bash", str(AGENT), "once", env=self.agent_env,
                              check=False, timeout=300)
        assert result.returncode == rc, result.stdout + result.stderr
        if any(c.startswith("-s reload") for c in self.nginx.calls()[calls:]):
            self.nginx.wait_reloaded(old)
        return result

    def client(self, hostname, scheme="https"):
        """(status code, body) of a request from the client namespace to the edge."""
        port = 443 if scheme == "https" else 80
        result = self.lab.run(
            "client", "curl", "-sS", "--max-time", "5", "--cacert", str(self.pebble.root),
            "--resolve", f"{hostname}:{port}:{self.lab.address('edge')}",
            "-w", "\n%{http_code}", f"{scheme}://{hostname}/", check=False)
        if result.returncode != 0:
            return None, result.stderr.strip()
        body, _, code = result.stdout.rpartition("\n")
        return int(code), body.strip()

    def client_until(self, hostname, expected_body, kick=None, timeout=40):
        """Retry a request until it answers 200 with expected_body (tunnels need a handshake)."""
        def answered():
            if kick:
                kick()
            return self.client(hostname) == (200, expected_body)
        wait_until(answered, timeout=timeout, interval=0.5,
                   what=f"{hostname} to answer {expected_body!r}")

    def kick_origin_b(self):
        """Traffic from the NAT'd origin towards the edge makes it (re)handshake now."""
        self.lab.run("origin-b", "curl", "-s", "-o", "/dev/null", "--max-time", "1",
                     "http://10.8.0.1:9/", check=False)

    def route(self, hostname, origin, port):
        status, _, route = self.kokoa.request("POST", "/api/v1/routes", {
            "hostname": hostname, "origin_id": origin["id"], "target_port": port})
        assert status == 201, route
        return route

    def close(self):
        if self.pebble:
            self.pebble.stop()
        if self.nginx:
            self.nginx.stop()
        self.kokoa.stop()
        self.lab.close()


@pytest.fixture
def world():
    require_root()
    require_tools(*TOOLS)
    workdir = Path(tempfile.mkdtemp(prefix="kokoa-e2e-", dir="/tmp"))
    workdir.chmod(0o755)                    # nginx workers (nobody) read the webroot
    built = World(workdir)
    try:
        yield built.build()
    finally:
        built.close()
        shutil.rmtree(workdir, ignore_errors=True)


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
