"""Real processes for Kokoa's end-to-end tests and benches: namespaces, WireGuard, nginx, pebble.

Everything lives in namespaces this module creates, on addresses that exist only there:
an underlay 198.18.0.0/24 (RFC 2544 benchmarking range) on a bridge in a "hub" namespace, and
the WireGuard overlay the test chooses. Every process is started by this module, owned by pid
and stopped in close(); close() deletes the namespaces (and with them every veth).
"""

import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from conftest import free_port, stop_process, wait_until

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

    def __init__(self, netns, target_port):
        self.target_port = target_port
        self.listener = None
        ready = threading.Event()
        thread = threading.Thread(target=self._bind, args=(netns, ready), daemon=True)
        thread.start()
        ready.wait(10)
        if self.listener is None:
            raise RuntimeError(f"could not listen inside {netns}")
        self.port = self.listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _bind(self, netns, ready):
        with in_netns(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
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
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
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
    access_log off;
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

    def __init__(self, workdir, http_port, netns=None):
        self.netns_args = ["ip", "netns", "exec", netns] if netns else []
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
        self.procs.append(subprocess.Popen(
            [*self.netns_args, "pebble-challtestsrv", "-dns01", f"127.0.0.1:{self.dns_port}",
             "-http01", "", "-https01", "", "-tlsalpn01", "",
             "-management", f"127.0.0.1:{self.dns_mgmt_port}",
             "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
            stdout=log, stderr=subprocess.STDOUT))
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
        self.procs.append(subprocess.Popen(
            [*self.netns_args, "pebble", "-config", str(self.dir / "pebble.json"), "-dnsserver",
             f"127.0.0.1:{self.dns_port}", "-strict=false"],
            stdout=log, stderr=subprocess.STDOUT, env=env))
        log.close()
        wait_until(lambda: self._get(self.directory), timeout=20, what="pebble directory")
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
        body = json.dumps({"host": host + ".", "addresses": [address]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.dns_mgmt_port}/add-a", data=body,
                                     method="POST")
        with urllib.request.urlopen(req, timeout=5):
            pass

    def stop(self):
        for proc in self.procs:
            stop_process(proc)
