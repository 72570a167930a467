"""Real processes for Kokoa's end-to-end tests and benches: namespaces, WireGuard, nginx, pebble,
a crafted control-plane double, HTTP backends, an edge running agent.sh, and the whole world.

NetLab's hosts live in namespaces this module creates, on addresses that exist only there:
an underlay 198.18.0.0/24 (RFC 2544 benchmarking range) on a bridge in a "hub" namespace, and
the WireGuard overlay the test chooses. Every process is started by this module, owned by pid
and stopped in close(); close() deletes the namespaces (and with them every veth).
Payloads for the double are built by kokoa.py's own generator (make_payload), never a copy.
"""

import contextlib
import ctypes
import hashlib
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import kokoa
from conftest import REPO, KokoaServer, free_port, stop_process, wait_until

AGENT = REPO / "agent.sh"
TOKEN = "edge-token-" + "x" * 40      # the node token ControlPlaneDouble accepts
UNDERLAY_PREFIX = "198.18.0"
CLONE_NEWNET = 0x40000000


def sh(*args, check=True, timeout=30, **kwargs):
    """Run a command, capturing output; raise with its stderr on failure."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def connects(host, port):
    """True if a TCP connection to host:port succeeds within a second."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wg_keypair():
    """(private, public) WireGuard keys from `wg genkey`/`wg pubkey`."""
    private = sh("wg", "genkey").stdout.strip()
    public = sh("wg", "pubkey", input=private).stdout.strip()
    return private, public


@contextlib.contextmanager
def in_netns(name):
    """Run the calling thread inside network namespace `name` for the with-block."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net", "rb") as home, \
            open(f"/run/netns/{name}", "rb") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back failed")


class Forwarder:
    """Listens on 127.0.0.1:port inside a namespace and relays to 127.0.0.1:target here.

    Lets a process in a namespace reach a service on this namespace's loopback (the control
    plane) without giving the host any new address.
    """

    def __init__(self, netns, target_port, port=0, target_netns=None):
        self.target_port = target_port
        self.target_netns = target_netns    # None: this namespace; else 127.0.0.1 in that one
        self.listener = None
        ready = threading.Event()
        thread = threading.Thread(target=self._bind, args=(netns, ready, port), daemon=True)
        thread.start()
        ready.wait(10)
        if self.listener is None:
            raise RuntimeError(f"could not listen inside {netns}")
        self.port = self.listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _bind(self, netns, ready, port):
        with in_netns(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(64)
        self.listener = sock
        ready.set()

    def _accept_loop(self):
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client):
        try:
            with in_netns(self.target_netns) if self.target_netns else contextlib.nullcontext():
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            upstream.settimeout(None)       # 10 s to connect, then as long as the ends wait
        except OSError:
            client.close()
            return
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self):
        self._closed = True
        self.listener.close()


class UdpForwarder:
    """Relays each UDP datagram to 127.0.0.1:port inside a namespace to 127.0.0.1:port here,
    and its answer back (DNS queries of a process in the namespace to a server here)."""

    def __init__(self, netns, port):
        self.port = port
        self.sock = None
        ready = threading.Event()
        threading.Thread(target=self._bind, args=(netns, ready), daemon=True).start()
        ready.wait(10)
        if self.sock is None:
            raise RuntimeError(f"could not bind UDP inside {netns}")
        threading.Thread(target=self._loop, daemon=True).start()

    def _bind(self, netns, ready):
        with in_netns(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", self.port))
        self.sock = sock
        ready.set()

    def _loop(self):
        while True:
            try:
                data, client = self.sock.recvfrom(65535)
            except OSError:
                return
            threading.Thread(target=self._relay, args=(data, client), daemon=True).start()

    def _relay(self, data, client):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
            upstream.settimeout(5)
            try:
                upstream.sendto(data, ("127.0.0.1", self.port))
                self.sock.sendto(upstream.recv(65535), client)
            except OSError:
                pass

    def close(self):
        self.sock.close()


class NetLab:
    """A set of namespaces on one bridged underlay, plus the processes started in them."""

    def __init__(self):
        self.tag = "k" + secrets.token_hex(3)          # unique per run; short for ifnames
        self.hub = f"{self.tag}-hub"
        self.hosts = {}                                # short name -> (netns, underlay ip)
        self.procs = []
        self.forwarders = []
        sh("ip", "netns", "add", self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")

    def add_host(self, name, index):
        """A namespace `<tag>-<name>` with 198.18.0.<index>/24 on the bridge; returns the ip."""
        netns = f"{self.tag}-{name}"
        address = f"{UNDERLAY_PREFIX}.{index}"
        sh("ip", "netns", "add", netns)
        hub_end, host_end = f"{self.tag}{index}h", f"{self.tag}{index}n"
        sh("ip", "link", "add", hub_end, "netns", self.hub, "type", "veth", "peer", "name",
           host_end, "netns", netns)
        sh("ip", "-n", self.hub, "link", "set", hub_end, "master", "br0", "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", host_end)
        sh("ip", "-n", netns, "link", "set", host_end, "up")
        self.hosts[name] = (netns, address)
        return address

    def netns(self, name):
        return self.hosts[name][0]

    def underlay_ifname(self, name):
        """The host's end of its veth to the bridge."""
        index = self.address(name).rsplit(".", 1)[1]
        return f"{self.tag}{index}n"

    def address(self, name):
        return self.hosts[name][1]

    def exec_args(self, name, *args):
        """argv that runs `args` inside host `name`'s namespace."""
        return ["ip", "netns", "exec", self.netns(name), *args]

    def run(self, name, *args, **kwargs):
        """Run a command inside host `name` and wait for it."""
        return sh(*self.exec_args(name, *args), **kwargs)

    def start(self, name, *args, log_path=None, env=None):
        """Start a long-running process inside host `name`; stopped by close()."""
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        proc = subprocess.Popen(self.exec_args(name, *args), stdout=out,
                                stderr=subprocess.STDOUT, env=env)
        if log_path:
            out.close()
        self.procs.append(proc)
        return proc

    def wireguard(self, name, ifname, private_key, address, listen_port=51820):
        """A wireguard-go interface in host `name` with a key, a port and an address."""
        env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        proc = self.start(name, "wireguard-go", "-f", ifname, env=env)
        wait_until(lambda: os.path.exists(f"/var/run/wireguard/{ifname}.sock"), timeout=10,
                   what=f"{ifname} socket")
        self.run(name, "wg", "set", ifname, "private-key", "/dev/stdin", "listen-port",
                 str(listen_port), input=private_key + "\n")
        self.run(name, "ip", "addr", "add", address, "dev", ifname)
        self.run(name, "ip", "link", "set", ifname, "up")
        return proc

    def forward_loopback(self, name, target_port):
        """127.0.0.1:<returned port> inside host `name` reaches 127.0.0.1:target_port here."""
        forwarder = Forwarder(self.netns(name), target_port)
        self.forwarders.append(forwarder)
        return forwarder.port

    def forward_dns(self, name, port):
        """127.0.0.1:port inside host `name`, UDP and TCP, reaches a DNS server on
        127.0.0.1:port here."""
        self.forwarders += [Forwarder(self.netns(name), port, port=port),
                            UdpForwarder(self.netns(name), port)]

    def forward_between(self, name, port, target):
        """127.0.0.1:port inside host `name` reaches 127.0.0.1:port inside host `target` (a
        loopback-only service, e.g. pebble, shared by another namespace, URLs unchanged)."""
        forwarder = Forwarder(self.netns(name), port, port=port,
                              target_netns=self.netns(target))
        self.forwarders.append(forwarder)
        return forwarder.port

    def close(self):
        """Stop every process (by pid), then delete the namespaces and their veths."""
        for forwarder in self.forwarders:
            forwarder.close()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        for netns, _ in self.hosts.values():
            sh("ip", "netns", "del", netns, check=False)
        sh("ip", "netns", "del", self.hub, check=False)


# nginx and pebble ##########################################################################

NGINX_WRAPPER = """#!/bin/sh
if [ "$1" = "-t" ] && [ -n "${{KOKOA_TEST_NGINX_HANG:-}}" ]; then
    : > "$KOKOA_TEST_NGINX_HANG"
    exec sleep 30
fi
if [ "$1" = "-s" ] && [ -n "${{KOKOA_TEST_NGINX_FAIL_RELOAD:-}}" ]; then
    echo "nginx: [error] simulated reload failure" >&2
    exit 1
fi
printf '%s\\n' "$*" >> "{log}"
exec nginx -p "{prefix}/" -c "{conf}" -g "pid {prefix}/run/nginx.pid;" "$@"
"""

NGINX_CONF = """worker_processes 1;
error_log {prefix}/logs/error.log;
events {{ worker_connections 256; }}
http {{
    # No `access_log off` here: it would also cancel the health log of agent.sh's default.conf.
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    include {config_dir}/*.conf;
    include {config_dir}/servers/*.conf;
}}
"""


class Nginx:
    """A private nginx instance under `prefix`, driven through a wrapper script (NGINX_BIN)."""

    def __init__(self, prefix, config_dir, conf_path=None, netns=None):
        self.netns_args = ["ip", "netns", "exec", netns] if netns else []
        self.prefix = Path(prefix)
        self.config_dir = Path(config_dir)
        for sub in ("conf", "logs", "run", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        self.calls_log = self.prefix / "calls.log"
        self.calls_log.touch()
        self.conf_path = Path(conf_path or self.prefix / "conf/nginx.conf")
        self.conf_path.parent.mkdir(parents=True, exist_ok=True)
        if conf_path is None:
            self.config_dir.mkdir(parents=True, exist_ok=True)
            self.conf_path.write_text(
                NGINX_CONF.format(prefix=self.prefix, config_dir=self.config_dir))
        else:                       # install-edge.sh adds the include lines
            self.conf_path.write_text(NGINX_CONF.format(prefix=self.prefix, config_dir="X")
                                      .replace("    include X/*.conf;\n", "")
                                      .replace("    include X/servers/*.conf;\n", ""))
        self.wrapper = self.prefix / "nginx-wrapper"
        self.wrapper.write_text(NGINX_WRAPPER.format(prefix=self.prefix, log=self.calls_log,
                                                     conf=self.conf_path))
        self.wrapper.chmod(0o755)
        self.pid_file = self.prefix / "run/nginx.pid"

    def start(self):
        subprocess.run([*self.netns_args, str(self.wrapper)], check=True, timeout=30,
                       capture_output=True)
        wait_until(self.master_pid, timeout=10, what="nginx pid file")
        wait_until(self.workers, timeout=10, what="nginx workers")
        return self

    def master_pid(self):
        try:
            return int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None

    def workers(self):
        """Pids of the master's current children."""
        master = self.master_pid()
        pids = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                pids.add(int(entry.name))
        return pids

    def calls(self):
        return self.calls_log.read_text().splitlines()

    def wait_reloaded(self, old_workers):
        """Wait until every worker from before the reload is gone and new ones serve."""
        wait_until(lambda: not (self.workers() & old_workers) and self.workers(), timeout=20,
                   what="old nginx workers to exit")

    def stop(self):
        master = self.master_pid()
        if master is None:
            return
        try:
            os.kill(master, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{master}").exists():
            time.sleep(0.05)
        if Path(f"/proc/{master}").exists():
            os.kill(master, signal.SIGKILL)


class Pebble:
    """pebble + pebble-challtestsrv on free loopback ports; HTTP-01 goes to `http_port`.

    With `netns`, both run inside that namespace (whose 127.0.0.1 is then the edge's).
    """

    def __init__(self, workdir, http_port, netns=None, dns_server=None):
        self.netns_args = ["ip", "netns", "exec", netns] if netns else []
        self.dns_server = dns_server        # host:port of a real DNS (else challtestsrv's)
        self.dir = Path(workdir) / "pebble"
        self.dir.mkdir()
        self.port, self.mgmt_port = free_port(), free_port()
        self.dns_port, self.dns_mgmt_port = free_port(), free_port()
        self.ca = self.dir / "ca.pem"
        self._make_listener_cert()
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": str(self.dir / "leaf.pem"), "privateKey": str(self.dir / "leaf.key"),
            "httpPort": http_port, "tlsPort": free_port(), "ocspResponderURL": "",
            "externalAccountBindingRequired": False}}
        (self.dir / "pebble.json").write_text(json.dumps(config))
        self.directory = f"https://127.0.0.1:{self.port}/dir"
        self.procs = []

    def _make_listener_cert(self):
        d = self.dir

        def openssl(*args):
            subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                "/CN=kokoa test pebble CA", "-keyout", str(d / "ca.key"), "-out", str(self.ca))
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                "-keyout", str(d / "leaf.key"), "-out", str(d / "leaf.csr"))
        (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("x509", "-req", "-in", str(d / "leaf.csr"), "-CA", str(self.ca), "-CAkey",
                str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile",
                str(d / "ext.cnf"), "-out", str(d / "leaf.pem"))

    def start(self):
        log = open(self.dir / "pebble.log", "ab")
        if self.dns_server is None:
            self.procs.append(subprocess.Popen(
                [*self.netns_args, "pebble-challtestsrv", "-dns01",
                 f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "", "-tlsalpn01", "",
                 "-management", f"127.0.0.1:{self.dns_mgmt_port}",
                 "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
                stdout=log, stderr=subprocess.STDOUT))
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
        self.procs.append(subprocess.Popen(
            [*self.netns_args, "pebble", "-config", str(self.dir / "pebble.json"), "-dnsserver",
             self.dns_server or f"127.0.0.1:{self.dns_port}", "-strict=false"],
            stdout=log, stderr=subprocess.STDOUT, env=env))
        log.close()
        wait_until(lambda: self._get(self.directory), timeout=20, what="pebble directory")
        if self.dns_server is None:
            wait_until(lambda: self._connects(self.dns_mgmt_port), timeout=20,
                       what="challtestsrv management")
        self.root = self.dir / "root.pem"
        self.root.write_bytes(self._get(f"https://127.0.0.1:{self.mgmt_port}/roots/0"))
        return self

    def _connects(self, port):
        return subprocess.run([*self.netns_args, "curl", "-s", "-o", "/dev/null",
                               f"http://127.0.0.1:{port}/"], timeout=10).returncode == 0

    def _get(self, url):
        proc = subprocess.run([*self.netns_args, "curl", "-sf", "--cacert", str(self.ca),
                               "--max-time", "5", url], capture_output=True, timeout=10)
        return proc.stdout if proc.returncode == 0 else None

    def add_a(self, host, address):
        """Make the mock DNS answer `host` with `address`."""
        body = json.dumps({"host": host + ".", "addresses": [address]})
        subprocess.run([*self.netns_args, "curl", "-sSf", "--max-time", "5", "--data-binary",
                        body, f"http://127.0.0.1:{self.dns_mgmt_port}/add-a"], check=True,
                       capture_output=True, timeout=10)     # inside pebble's namespace

    def stop(self):
        for proc in self.procs:
            stop_process(proc)


KNOT_CONF = """server:
    rundir: "{base}/run"
    listen: {listen}@{port}
log:
  - target: stderr
    any: info
database:
    storage: "{base}/db"
key:
  - id: kokoa-dns
    algorithm: hmac-sha256
    secret: {secret}
acl:
  - id: update
    key: kokoa-dns
    action: [update, transfer]
template:
  - id: default
    storage: "{base}/zones"
    file: "%s.zone"
    zonefile-sync: -1
zone:
  - domain: {zone}
    acl: [update]
"""


class Knot:
    """knotd serving one zone on 127.0.0.1:port (of namespace `netns`, else here), updatable
    with one TSIG key (RFC 2136): the DNS of dns.py's rfc2136 provider, and pebble's."""

    def __init__(self, workdir, zone, records=(), netns=None):
        self.netns_args = ["ip", "netns", "exec", netns] if netns else []
        self.base = Path(workdir) / "knot"
        for sub in ("run", "db", "zones"):
            (self.base / sub).mkdir(parents=True)
        self.zone, self.port = zone, free_port()
        out = sh("keymgr", "-t", "kokoa-dns", "hmac-sha256").stdout
        self.secret = out.splitlines()[0].split(":", 2)[2]
        head = [f"$ORIGIN {zone}.", "$TTL 60", "@ SOA ns1 hostmaster 1 3600 900 604800 60",
                "@ NS ns1", "ns1 A 192.0.2.53", *records]
        (self.base / "zones" / f"{zone}.zone").write_text("\n".join(head) + "\n")
        (self.base / "knot.conf").write_text(KNOT_CONF.format(
            base=self.base, listen="127.0.0.1", port=self.port, secret=self.secret, zone=zone))
        self.proc = None

    def start(self):
        with open(self.base / "knotd.log", "ab") as log:
            self.proc = subprocess.Popen([*self.netns_args, "knotd", "-c",
                                          str(self.base / "knot.conf")],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.dig(self.zone, "SOA"), timeout=20, what="knotd")
        return self

    def env(self):
        """dns.py's (and the control plane's) settings for this server."""
        return {"KOKOA_DNS_PROVIDER": "rfc2136", "KOKOA_DNS_ZONE": self.zone,
                "KOKOA_DNS_SERVER": f"127.0.0.1:{self.port}", "KOKOA_DNS_TSIG_NAME": "kokoa-dns",
                "KOKOA_DNS_TSIG_SECRET": self.secret, "KOKOA_DNS_TSIG_ALGORITHM": "hmac-sha256"}

    def dig(self, name, rtype="A"):
        """kdig +short over TCP: the sorted answer lines ([] when there are none)."""
        out = subprocess.run([*self.netns_args, "kdig", "@127.0.0.1", "-p", str(self.port),
                              "+tcp", "+time=3", "+retry=0", "+short", name, rtype],
                             capture_output=True, text=True, timeout=15).stdout
        return sorted(line for line in out.splitlines() if line)

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc)


# The edge payload, as kokoa.py makes it ####################################################

def make_payload(routes, staging=False, nginx_map=None, hostnames=None, schema=1, peers=()):
    """kokoa.edge_payload of {hostname: "ip:port" or a route object}, with a correct config_hash.

    A route object of schema 2 may hold "access": an access policy in its payload form (see
    access_policy), which goes to the payload's top-level "access" under its key, the route then
    naming the key (policy-contract.md). `nginx_map` / `hostnames` replace what kokoa rendered
    (for hostile payloads); config_hash is then computed again, so that only the content is
    wrong.
    """
    routes = {hostname: dict(address) if isinstance(address, dict) else {"upstream": address}
              for hostname, address in routes.items()}
    payload, unserved = kokoa.edge_payload(routes, list(peers), staging, schema)
    assert not unserved, unserved
    if nginx_map is not None:
        payload["nginx_map"] = nginx_map
    if hostnames is not None:
        payload["hostnames"] = hostnames
    return rehash(payload)


def access_policy(users=(), allow=(), deny=(), require="any", bypass_paths=(),
                  forward_auth=None, pass_authorization=False):
    """An access policy in its payload form (all seven keys): `users` as (name, crypt hash)
    pairs, lists sorted and deduplicated as the control plane sends them."""
    return {"users": [{"username": name, "hash": hashed} for name, hashed in sorted(users)],
            "allow": sorted(set(allow)), "deny": sorted(set(deny)), "require": require,
            "bypass_paths": sorted(set(bypass_paths)), "forward_auth": forward_auth,
            "pass_authorization": pass_authorization}


def sha512_crypt(password):
    """A $6$ crypt hash of `password` from `openssl passwd -6` (password on stdin)."""
    return sh("openssl", "passwd", "-6", "-stdin", input=password + "\n").stdout.strip()


def rehash(payload):
    """Set payload's config_hash as kokoa computes it (after a test changed it); return it."""
    content = {key: value for key, value in payload.items() if key != "config_hash"}
    payload["config_hash"] = kokoa.sha256_hex(kokoa.canonical_json(content))
    return payload


# A control-plane double, HTTP backends and an edge running agent.sh ########################

class ControlPlaneDouble:
    """A crafted control plane: serves `payload` (dict, or raw bytes) to the right token."""

    def __init__(self):
        self.payload = make_payload({})
        self.status = None          # force this HTTP status on /me/config
        self.etag = None            # override the ETag header
        self.delay = 0.0            # seconds to wait before answering /me/config
        self.stream_bytes = 0       # answer /me/config with this many bytes, no Content-Length
        self.reports = []
        self.config_requests = []
        self.status_requests = []   # the headers of each /me/status
        self.refuse_field = None    # answer a /me/status holding this field 400, as an older
                                    # control plane does
        self.hang_up = set()        # paths whose requests are read and never answered
        double = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _authorized(self):
                return self.headers.get("Authorization") == f"Bearer {TOKEN}"

            def _send(self, status, body=b"", headers=()):
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                if status not in (204, 304):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if status not in (204, 304):
                    self.wfile.write(body)

            def _error(self, status, code):
                body = json.dumps({"error": {"code": code, "message": f"{code} ({status})"}})
                self._send(status, body.encode(), [("Content-Type", "application/json")])

            def do_GET(self):  # noqa: N802 (http.server API)
                double.config_requests.append(dict(self.headers))
                time.sleep(double.delay)
                if self.path != "/api/v1/edge-nodes/me/config":
                    return self._error(404, "not_found")
                if double.status:
                    return self._error(double.status, "forced")
                if not self._authorized():
                    return self._error(401, "unauthorized")
                if double.stream_bytes:
                    return self._stream(double.stream_bytes)
                payload = double.payload
                if isinstance(payload, bytes):
                    return self._send(200, payload, [("Content-Type", "application/json")])
                etag = double.etag or payload.get("config_hash", "")
                if self.headers.get("If-None-Match") == f'"{etag}"':
                    return self._send(304, headers=[("ETag", f'"{etag}"')])
                body = json.dumps(payload).encode()
                self._send(200, body, [("Content-Type", "application/json"),
                                       ("ETag", f'"{etag}"')])

            def _stream(self, count):
                """A JSON-looking body of `count` bytes that ends only when the connection
                closes (HTTP/1.0 style: no Content-Length, no chunks)."""
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = b" " * 65536
                try:
                    self.wfile.write(b'{"hostnames": [')
                    for _ in range(count // len(chunk) + 1):
                        self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass            # the agent hung up: what it should do
                self.close_connection = True

            def do_POST(self):  # noqa: N802 (http.server API)
                double.status_requests.append(dict(self.headers))
                if self.path in double.hang_up:
                    self.rfile.read(int(self.headers.get("Content-Length", "0")))
                    self.close_connection = True
                    return
                if self.path != "/api/v1/edge-nodes/me/status":
                    return self._error(404, "not_found")
                if not self._authorized():
                    return self._error(401, "unauthorized")
                length = int(self.headers.get("Content-Length", "0"))
                report = json.loads(self.rfile.read(length))
                if double.refuse_field in report:
                    body = json.dumps({"error": {"code": "invalid_field", "message": "unknown",
                                                 "field": double.refuse_field}})
                    return self._send(400, body.encode(), [("Content-Type", "application/json")])
                double.reports.append(report)
                self._send(204)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class WebhookReceiver:
    """An alert receiver on loopback: records each POST (path, headers, body) and answers
    `status`; with `hang`, it accepts and reads the request but never answers (until close)."""

    def __init__(self, status=204, hang=False):
        self.status = status
        self.hang = hang
        self.received = []
        self.released = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 (http.server API)
                length = int(self.headers.get("Content-Length", "0"))
                receiver.received.append({"path": self.path, "headers": dict(self.headers),
                                          "body": self.rfile.read(length),
                                          "at": time.monotonic()})
                if receiver.hang:
                    receiver.released.wait(120)
                    return
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def json_bodies(self):
        return [json.loads(item["body"]) for item in self.received]

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


class BackendNet:
    """A fresh netns joined to this one by a veth pair, with a private address inside it:
    backends listen there, so nginx reaches them as it reaches an origin, at an address that is
    not loopback (which the agent refuses as an upstream)."""

    def __init__(self):
        tag = os.urandom(3).hex()
        self.ns = f"kokoa-at-{tag}"
        self.veth = f"kat{tag}"
        self.subnet = f"10.{200 + os.urandom(1)[0] % 50}.{os.urandom(1)[0]}"
        self.address = f"{self.subnet}.2"

    def start(self):
        ns, veth, subnet = self.ns, self.veth, self.subnet
        for args in (["netns", "add", ns],
                     ["link", "add", veth + "a", "type", "veth", "peer", "name", veth + "b",
                      "netns", ns],
                     ["addr", "add", f"{subnet}.1/24", "dev", veth + "a"],
                     ["link", "set", veth + "a", "up"],
                     ["-n", ns, "addr", "add", f"{subnet}.2/24", "dev", veth + "b"],
                     ["-n", ns, "link", "set", veth + "b", "up"],
                     ["-n", ns, "link", "set", "lo", "up"]):
            subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)
        return self

    def stop(self):
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.veth + "a"], capture_output=True, timeout=30)


class NetnsService:
    """A threaded stdlib HTTP server in `net` (a started BackendNet) at its private address
    (`addr`, ip:port): GET and POST go to answer(handler, body), which each subclass defines."""

    def __init__(self, net):
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 (http.server API)
                length = int(self.headers.get("Content-Length") or 0)
                service.answer(self, self.rfile.read(length) if length else b"")

            do_POST = do_GET  # noqa: N815 (http.server API)

        with in_netns(net.ns):
            self.server = http.server.ThreadingHTTPServer((net.address, 0), Handler)
        self.server.block_on_close = False
        self.addr = f"{net.address}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Backend(NetnsService):
    """An HTTP backend answering `<name> <path>` and recording request headers in `seen`
    (http.client messages: names match in any case, as HTTP/2 lower-cases them) and the raw
    paths in `paths`, listening in `net` (a started BackendNet) at its private address. A
    WebSocket handshake gets 101."""

    def __init__(self, name, net):
        self.name = name
        self.seen = []
        self.paths = []
        super().__init__(net)

    def answer(self, handler, body):
        self.seen.append(handler.headers)
        self.paths.append(handler.path)
        if handler.headers.get("Upgrade", "").lower() == "websocket":
            handler.send_response(101)              # the handshake, then hang up
            handler.send_header("Upgrade", "websocket")
            handler.send_header("Connection", "Upgrade")
            handler.end_headers()
            handler.close_connection = True
            return
        reply = f"{self.name} {handler.path}".encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(reply)))
        handler.end_headers()
        handler.wfile.write(reply)


class ForwardAuthVerifier(NetnsService):
    """A forward-auth verifier as nginx's auth_request meets one (Authelia, oauth2-proxy), in
    `net` (a started BackendNet) at its private address: the cookie `session=good` gets 200 and
    the USER headers, `session=forbidden` 403, anything else 401. `seen` records each request's
    method, path, headers (an http.client message) and the body bytes it carried."""

    USER = {"Remote-User": "alice", "Remote-Groups": "admins,dev", "Remote-Name": "Alice",
            "Remote-Email": "alice@example.test"}

    def __init__(self, net):
        self.seen = []
        super().__init__(net)

    def answer(self, handler, body):
        self.seen.append({"method": handler.command, "path": handler.path,
                          "headers": handler.headers, "body": body})
        cookie = handler.headers.get("Cookie", "")
        status, headers = 401, {}
        if "session=good" in cookie:
            status, headers = 200, self.USER
        elif "session=forbidden" in cookie:
            status = 403
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", "0")
        handler.end_headers()


class Edge:
    """One edge under a world-readable temporary directory: nginx + the agent's settings."""

    def __init__(self, root, control_plane_url, token=TOKEN):
        self.root = Path(root)
        self.http_port = free_port()
        self.https_port = free_port()
        self.config_dir = self.root / "nginx-kokoa"
        self.state_dir = self.root / "state"
        self.nginx = Nginx(self.root / "nginx", self.config_dir)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CONTROL_PLANE_URL": control_plane_url,
            "NODE_TOKEN": token,
            "CONFIG_DIR": str(self.config_dir),
            "STATE_DIR": str(self.state_dir),
            "WEBROOT": str(self.root / "webroot"),
            "LETSENCRYPT_DIR": str(self.root / "letsencrypt"),
            "FALLBACK_CERT": str(self.root / "fallback/fallback.crt"),
            "FALLBACK_KEY": str(self.root / "fallback/fallback.key"),
            "NGINX_BIN": str(self.nginx.wrapper),
            "HTTP_PORT": str(self.http_port),
            "HTTPS_PORT": str(self.https_port),
            "LISTEN_ADDRESSES": "127.0.0.1",
            "WG_INTERFACE": "none",     # WireGuard has its own tests (test_e2e.py)
        }

    def agent(self, *args, env=None, timeout=120, check_rc=None):
        """Run `bash agent.sh ARGS` with the edge's settings; return the CompletedProcess."""
        full_env = dict(self.env, **(env or {}))
        proc = subprocess.run(["bash", str(AGENT), *args], env=full_env, capture_output=True,
                              text=True, timeout=timeout)
        if check_rc is not None:
            assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
        return proc

    def once(self, rc=0, **kwargs):
        """Run `agent.sh once`, expect `rc`, and wait for a reload to take effect."""
        old = self.nginx.workers()
        reloads = self.reload_count()
        proc = self.agent("once", check_rc=rc, **kwargs)
        if self.reload_count() > reloads:
            self.nginx.wait_reloaded(old)
        return proc

    def reload_count(self):
        return sum(1 for call in self.nginx.calls() if call == "-s reload")

    def snapshot(self):
        """Map each file under CONFIG_DIR to (content, mtime_ns)."""
        return {str(p.relative_to(self.config_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
                for p in sorted(self.config_dir.rglob("*")) if p.is_file()}

    def server_files(self):
        return sorted(p.name for p in (self.config_dir / "servers").glob("*"))

    def stray_files(self):
        """Temporary files or directories the agent should not have left behind."""
        found = []
        for base in (self.config_dir, self.state_dir):
            for path in base.rglob("*"):
                if ".tmp." in path.name or path.name.startswith((".kokoa-", ".")):
                    found.append(str(path))
        return found

    def get(self, host, path="/", tls=False, cacert=None, extra=()):
        """curl HOST over http or https (SNI = host) via 127.0.0.1; return (code, body)."""
        code, _, body = self.request(host, path, tls=tls, cacert=cacert, extra=extra)
        return code, body

    def request(self, host, path="/", tls=False, cacert=None, extra=()):
        """curl HOST as get() does, the path sent as it is (dot segments and all); return
        (code, headers with lower-case names, body), or (None, {}, curl's error)."""
        port = self.https_port if tls else self.http_port
        scheme = "https" if tls else "http"
        cmd = ["curl", "-sS", "--max-time", "10", "--path-as-is", "-D", "-", "-o", "-", "-w",
               "\n%{http_code}", "--resolve", f"{host}:{port}:127.0.0.1",
               f"{scheme}://{host}:{port}{path}"]
        if tls:
            cmd[1:1] = ["--cacert", str(cacert)] if cacert else ["-k"]
        cmd[1:1] = list(extra)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        if proc.returncode != 0:
            return None, {}, proc.stderr.strip()
        head, _, rest = proc.stdout.partition("\n\n")     # text mode: CRLF is read as LF
        body, _, code = rest.rpartition("\n")
        headers = {}
        for line in head.split("\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(code), headers, body


class NetnsBackends:
    """HTTP backends on a private address reachable over a veth pair into a fresh netns."""

    def __init__(self, count):
        self.net = BackendNet()
        self.ns, self.address = self.net.ns, self.net.address
        self.procs = []
        self.ports = [free_port() for _ in range(count)]

    def start(self):
        ns = self.net.start().ns
        for index, port in enumerate(self.ports):
            directory = Path(tempfile.mkdtemp(prefix="kokoa-backend-"))
            (directory / "whoami").write_text(f"backend{index}")
            self.procs.append((subprocess.Popen(
                ["ip", "netns", "exec", ns, "python3", "-m", "http.server", str(port), "--bind",
                 self.address, "--directory", str(directory)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), directory))
        for port in self.ports:
            wait_until(lambda p=port: connects(self.address, p), timeout=15,
                       what="netns backend")
        return self

    def stop(self):
        for proc, directory in self.procs:
            stop_process(proc)
            shutil.rmtree(directory, ignore_errors=True)
        self.net.stop()


# The whole system in namespaces (test_e2e, bench/dataplane) ################################

TOOLS = ("ip", "wireguard-go", "wg", "wg-quick", "nginx", "certbot", "pebble",
         "pebble-challtestsrv", "jq", "curl", "flock", "openssl", "nft")
NAT_RULES = """table inet natsim {{
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{underlay}" ct state new drop
    }}
}}
"""


STATIC_ORIGIN = """server {{
    listen {address}:{port};
    root {docroot};
    location = /stub_status {{
        stub_status;
    }}
}}
"""


@contextlib.contextmanager
def built_world(prefix):
    """A World built under a fresh /tmp directory named `prefix`..., torn down on exit."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    workdir.chmod(0o755)                    # nginx workers (nobody) read the webroot
    world = World(workdir)
    try:
        yield world.build()
    finally:
        world.close()
        shutil.rmtree(workdir, ignore_errors=True)


class World:
    """Everything the end-to-end journey needs, built in order; close() takes it all down."""

    def __init__(self, workdir):
        self.dir = workdir
        self.lab = NetLab()
        self.kokoa = KokoaServer(workdir / "cp")
        self.nginx = None
        self.pebble = None
        self.edge_if = f"{self.lab.tag}e"
        self.extra_nginx = []
        self.netns_etc = None
        self.edges = []             # more edges (add_edge), after the first one build() makes

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

    def extra_nginx_in(self, name, host, server_conf):
        """Another nginx, in host `host`'s namespace, with the harness's main config and
        `server_conf` as its one site; stopped in close()."""
        nginx = Nginx(self.dir / name, self.dir / f"{name}-conf", netns=self.lab.netns(host))
        (nginx.config_dir / "site.conf").write_text(server_conf)
        self.extra_nginx.append(nginx)
        return nginx.start()

    def static_origin(self, name, host, address, port, docroot):
        """nginx serving `docroot` at address:port in `host` (Range requests, stub_status): an
        origin like a media or file server's downloads."""
        return self.extra_nginx_in(name, host, STATIC_ORIGIN.format(
            address=address, port=port, docroot=docroot))

    def accepted_connections(self, address, port):
        """Connections a static_origin at address:port has accepted so far (its stub_status,
        asked from the edge; the asking adds one)."""
        status = self.lab.run("edge", "curl", "-sSf", "--max-time", "5",
                              f"http://{address}:{port}/stub_status")
        return int(status.stdout.splitlines()[2].split()[0])

    def client_resolves(self, *hostnames):
        """Tools without curl's --resolve (h2load, wrk, testssl.sh) find `hostnames` at the
        edge: `ip netns exec` bind-mounts /etc/netns/<client ns>/hosts; close() removes it."""
        self.netns_etc = Path("/etc/netns") / self.lab.netns("client")
        self.netns_etc_parent_made = not self.netns_etc.parent.exists()
        self.netns_etc.mkdir(parents=True, exist_ok=True)
        (self.netns_etc / "hosts").write_text(
            f"127.0.0.1 localhost\n{self.lab.address('edge')} {' '.join(hostnames)}\n")

    def add_edge(self, name):
        """Another edge, `name`, in its own namespace: its own nginx (ports 80/443 on its
        underlay address), agent settings like the first edge's, pebble's directory reachable
        at the same URL; no WireGuard (its tests are about certificates). Returns a WorldEdge;
        close() stops it."""
        index = 5 + len(self.edges)         # build() uses 1-4
        address = self.lab.add_host(name, index)
        edge_id, token = self.kokoa.register_edge(name)
        root = self.dir / name
        root.mkdir()
        nginx = Nginx(root / "nginx", root / "nginx-kokoa", netns=self.lab.netns(name))
        edge = WorldEdge(self, name, address, edge_id, token, nginx.start())
        self.lab.forward_between(name, self.pebble.port, "edge")
        cp_port = self.lab.forward_loopback(name, self.kokoa.port)
        edge.agent_env = {**self.agent_env,
                          "CONTROL_PLANE_URL": f"http://127.0.0.1:{cp_port}",
                          "NODE_TOKEN": token, "CONFIG_DIR": str(root / "nginx-kokoa"),
                          "STATE_DIR": str(root / "state"), "WEBROOT": str(root / "webroot"),
                          "LETSENCRYPT_DIR": str(root / "letsencrypt"),
                          "FALLBACK_CERT": str(root / "fallback/fallback.crt"),
                          "FALLBACK_KEY": str(root / "fallback/fallback.key"),
                          "NGINX_BIN": str(nginx.wrapper), "WG_INTERFACE": "none"}
        self.edges.append(edge)
        return edge

    def pebble_with_dns(self, knot):
        """Replace pebble by one that resolves through `knot` (a netlab.Knot here, relayed
        into the edge's namespace): DNS-01 against real records. Edges use the new one."""
        self.lab.forward_dns("edge", knot.port)
        self.pebble.stop()
        (self.dir / "pebble-knot").mkdir()
        self.pebble = Pebble(self.dir / "pebble-knot", 80, netns=self.lab.netns("edge"),
                             dns_server=f"127.0.0.1:{knot.port}")
        self.pebble.start()
        for env in [self.agent_env] + [edge.agent_env for edge in self.edges]:
            env.update(ACME_SERVER=self.pebble.directory, ACME_CA_BUNDLE=str(self.pebble.ca))
        return self.pebble

    def first_edge(self):
        """The edge build() made, as a WorldEdge (the same nginx, settings and namespace)."""
        edge = WorldEdge(self, "edge", self.lab.address("edge"), self.edge_id, self.token,
                         self.nginx)
        edge.agent_env = self.agent_env
        return edge

    def issued_orders(self):
        """How many certificates pebble has issued so far (its log says so once each)."""
        log = (self.pebble.dir / "pebble.log").read_text(errors="replace")
        return log.count("Issued certificate serial")

    def new_orders(self):
        """How many ACME orders pebble was asked for so far, issued or not (what counts
        against a CA's rate limits)."""
        log = (self.pebble.dir / "pebble.log").read_text(errors="replace")
        return log.count("Added order")

    def close(self):
        for edge in self.edges:
            edge.nginx.stop()
        for nginx in self.extra_nginx:
            nginx.stop()
        if self.netns_etc is not None:
            shutil.rmtree(self.netns_etc, ignore_errors=True)
            if self.netns_etc_parent_made:
                with contextlib.suppress(OSError):       # only if empty: others may use it
                    self.netns_etc.parent.rmdir()
        if self.pebble:
            self.pebble.stop()
        if self.nginx:
            self.nginx.stop()
        self.kokoa.stop()
        self.lab.close()


class WorldEdge:
    """One edge of a World: its namespace, nginx, agent settings and node token."""

    def __init__(self, world, name, address, edge_id, token, nginx):
        self.world, self.name, self.address = world, name, address
        self.edge_id, self.token, self.nginx = edge_id, token, nginx
        self.agent_env = {}

    def agent(self, *args, env=None, timeout=300):
        """Start `agent.sh ARGS` inside this edge's namespace (a Popen: it may be killed)."""
        return subprocess.Popen(
            self.world.lab.exec_args(self.name, "bash", str(AGENT), *args),
            env={**self.agent_env, **(env or {})}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def once(self, rc=0, env=None):
        """Run `agent.sh once` here; wait until a reload (if any) took effect; its output."""
        old = self.nginx.workers()
        calls = len(self.nginx.calls())
        result = self.world.lab.run(self.name, "bash", str(AGENT), "once",
                                    env={**self.agent_env, **(env or {})}, check=False,
                                    timeout=300)
        assert rc is None or result.returncode == rc, result.stdout + result.stderr
        if any(c.startswith("-s reload") for c in self.nginx.calls()[calls:]):
            self.nginx.wait_reloaded(old)
        return result.stdout + result.stderr

    def served_certificate(self, hostname):
        """The SHA-256 fingerprint of the certificate this edge shows for `hostname` (SNI), as
        the client namespace sees it."""
        lab = self.world.lab
        shown = lab.run("client", "openssl", "s_client", "-connect", f"{self.address}:443",
                        "-servername", hostname, input="", check=False, timeout=30).stdout
        pem = shown[shown.find("-----BEGIN CERTIFICATE-----"):
                    shown.find("-----END CERTIFICATE-----") + 25]
        return lab.run("client", "openssl", "x509", "-noout", "-fingerprint", "-sha256",
                       input=pem, check=False).stdout.strip()


# A workload origin for real applications' traffic (test_workloads) ########################

WORKLOAD_SERVER = r'''"""Kokoa's workload origin: uploads, header echo, events, JSON, WebSocket."""
import base64
import hashlib
import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROGRESS = {}                   # upload id -> bytes received so far
LOCK = threading.Lock()
DOCUMENT = json.dumps({"items": [
    {"id": i, "name": f"item {i}", "tags": ["alpha", "beta", "gamma"], "enabled": i % 2 == 0}
    for i in range(250)]}).encode()
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"      # RFC 6455 section 1.3


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, value, status=200):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body_pieces(self):
        """The request body in pieces, de-chunked when it came chunked."""
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            yield from self.exactly(int(self.headers.get("Content-Length", "0")))
            return
        while True:
            left = int(self.rfile.readline().split(b";")[0], 16)
            if left == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass            # trailers, up to the blank line
                return
            yield from self.exactly(left)
            self.rfile.readline()   # the CRLF after each chunk

    def exactly(self, left):
        """The next `left` bytes of the body, in pieces of at most 1 MiB."""
        while left:
            piece = self.rfile.read1(min(left, 1 << 20))
            if not piece:
                raise ConnectionError("body ended early")
            left -= len(piece)
            yield piece

    def upload(self):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        upload_id = query.get("id", ["-"])[0]
        digest, count, first = hashlib.sha256(), 0, None
        for piece in self.body_pieces():
            first = first or time.time()
            digest.update(piece)
            count += len(piece)
            with LOCK:
                PROGRESS[upload_id] = count
        self.send_json({"sha256": digest.hexdigest(), "bytes": count,
                        "chunked": "Transfer-Encoding" in self.headers,
                        "first_byte_at": first, "done_at": time.time()})

    def do_PUT(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/upload":
            return self.upload()
        return self.send_json({"error": "not found"}, 404)

    do_POST = do_PUT

    def do_GET(self):
        parts = urllib.parse.urlsplit(self.path)
        if parts.path == "/healthz":
            return self.send_json({"ok": True})
        if parts.path == "/headers":
            return self.send_json({"headers": list(self.headers.items()),
                                   "peer": self.client_address[0]})
        if parts.path == "/progress":
            upload_id = urllib.parse.parse_qs(parts.query).get("id", ["-"])[0]
            with LOCK:
                return self.send_json({"bytes": PROGRESS.get(upload_id, 0)})
        if parts.path == "/json":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(DOCUMENT)))
            self.end_headers()
            self.wfile.write(DOCUMENT)
            return None
        if parts.path == "/sse":
            return self.events()
        if parts.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket_echo()
        return self.send_json({"error": "not found"}, 404)

    def websocket_echo(self):
        """RFC 6455: every message back as it came (one frame each), ping -> pong, close."""
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", base64.b64encode(accept).decode())
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length >= 126:
                length = int.from_bytes(self.rfile.read(2 if length == 126 else 8), "big")
            mask = self.rfile.read(4)               # a client's frames are always masked
            data = self.rfile.read(length)
            key_stream = (mask * (length // 4 + 1))[:length]
            data = (int.from_bytes(data, "big") ^ int.from_bytes(key_stream, "big")
                    ).to_bytes(length, "big")
            first = 0x8A if opcode == 0x9 else head[0]      # a ping's answer is a pong
            size = (bytes([length]) if length < 126 else
                    bytes([126]) + length.to_bytes(2, "big") if length < 65536 else
                    bytes([127]) + length.to_bytes(8, "big"))
            self.wfile.write(bytes([first]) + size + data)
            self.wfile.flush()
            if opcode == 0x8:
                return

    def events(self):
        """`data: 1` at once, then one more event a second, for ~3 s; chunked framing."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for number in range(1, 5):
            if number > 1:
                time.sleep(1)
            event = f"data: {number}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512        # an app server's backlog, not socketserver's 5


Server((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
'''


def write_random_file(path, size):
    """Fill `path` with `size` bytes (a multiple of 1 MiB) of random data; its SHA-256."""
    digest = hashlib.sha256()
    with Path(path).open("wb") as out:
        for _ in range(size // (1 << 20)):
            piece = os.urandom(1 << 20)
            digest.update(piece)
            out.write(piece)
    return digest.hexdigest()


def upload_speed(result):
    """(the workload origin's JSON answer, curl's upload speed in MiB/s) from a curl -T ...
    -w '\\n%{speed_upload}' run."""
    assert result.returncode == 0, result.stderr
    body, _, speed = result.stdout.rpartition("\n")
    return json.loads(body), float(speed) / (1 << 20)


class WorkloadOrigin:
    """WORKLOAD_SERVER, a threaded stdlib HTTP server, at address:port inside host `host` of a
    NetLab (an origin's WireGuard address). Endpoints: PUT/POST /upload[?id=X] (the body, chunked
    or not, streamed into SHA-256: JSON sha256, bytes, chunked, first_byte_at, done_at),
    GET /progress?id=X (bytes of upload X received so far), GET /headers (the request headers
    as a list of [name, value] and the peer address), GET /sse (text/event-stream with
    X-Accel-Buffering: no; `data: 1` at once, `data: 2..4` a second apart), GET /json (~20 KB
    of uncompressed JSON), GET /ws (a WebSocket echo), GET /healthz."""

    def __init__(self, lab, host, address, port, workdir):
        self.lab, self.host, self.address, self.port = lab, host, address, port
        self.url = f"http://{address}:{port}"
        self.script = Path(workdir) / "workload_origin.py"
        self.proc = None

    def start(self):
        self.script.write_text(WORKLOAD_SERVER)
        self.proc = self.lab.start(self.host, "python3", str(self.script), self.address,
                                   str(self.port))
        wait_until(lambda: self.get("/healthz").returncode == 0, timeout=15,
                   what=f"workload origin {self.url}")
        return self

    def get(self, path, from_host=None):
        """curl url+path from `from_host` (default: the origin's own namespace)."""
        return self.lab.run(from_host or self.host, "curl", "-sf", "--max-time", "5",
                            self.url + path, check=False)

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc)
