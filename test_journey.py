"""From nothing to a working HTTPS site, on fresh Debian 12 machines (issue 17 item 2).

Each role (control plane, edge, origin) is a fresh root from `debian_tarball`, run with
`unshare --mount --pid --fork` + `chroot` in its own network namespace (netlab). Inside them the
test types the README's walkthrough lines, taken from README.md (with `example.test` for
`example.com`), so the README and this test cannot drift. apt and pip in the roots reach only the
Debian and Python registries, through a small allow-listing proxy on the host side of a veth.
pebble (in its own namespace) is the ACME server; a client namespace does
`curl https://app.example.test/`. What the test does to the machines beforehand (a cloud image's
sudo, curl and CA store, /etc/hosts, the proxy, the ACME directory) is machine setup, not typed.

Found on these machines (checked when this test was written): kernel WireGuard is absent inside
the roots too (`ip link add ... type wireguard`: "Unknown device type"), so wg-quick falls back
to wireguard-go (the host's binary, copied into the roots as machine setup); systemd does not
run (PID 1 is not systemd, no /run/systemd/system), so the installers take their loop mode (no
cron daemon in a fresh root either); `systemd-nspawn` is not installed (systemd-container) and
would need systemd's cgroup hierarchy; `podman run` of the same root (`podman import`) fails in
crun: "setrlimit RLIMIT_NOFILE: Operation not permitted", also with `--ulimit host
--cgroups=disabled`. Hence `unshare` + `chroot`.
"""

import functools
import http.server
import json
import os
import re
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, require_root, require_tools, stop_process, wait_until
from netlab import NetLab

DOMAIN = "example.test"
ALLOWED = {"deb.debian.org", "security.debian.org", "pypi.org", "files.pythonhosted.org"}
CHECKOUT = ("kokoa.py", "static", "requirements.txt", "agent.sh", "install-edge.sh",
            "install-origin.sh", "dns.py")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# The README's lines ##########################################################################

def walkthrough_blocks():
    """The fenced code blocks of the README's walkthrough, in order, with example.test."""
    text = (REPO / "README.md").read_text()
    body = text.split("\n## Walkthrough", 1)[1].split("\n## ", 1)[0]
    blocks = [textwrap_dedent(b) for b in re.findall(r"```\n(.*?)\n *```", body, re.S)]
    return [b.replace("example.com", DOMAIN) for b in blocks]


def textwrap_dedent(block):
    return "\n".join(line.strip() for line in block.splitlines())


def test_the_walkthrough_is_four_pastes_and_the_quick_start():
    text = (REPO / "README.md").read_text()
    quick = re.search(r"```\n(.*?)\n```", text.split("\n## Quick start\n", 1)[1], re.S).group(1)
    control, edge, origin = walkthrough_blocks()
    assert control.splitlines()[1] == quick.replace("example.com", DOMAIN)
    assert "/install/edge.sh | sudo --preserve-env=KOKOA_ENROLL_KEY bash -s" in edge
    assert "/install/origin.sh | sudo --preserve-env=KOKOA_ORIGIN_TOKEN bash -s" in origin
    assert len(control.splitlines()) + len(edge.splitlines()) + len(origin.splitlines()) <= 4


# Only the registries: an allow-listing HTTP proxy ###########################################

class RegistryProxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """GET of http://ALLOWED/... and CONNECT to ALLOWED:443; everything else 403."""
    daemon_threads = True

    def __init__(self, address):
        super().__init__(address, ProxyHandler)
        self.refused = []
        threading.Thread(target=self.serve_forever, daemon=True).start()


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def refuse(self, what):
        self.server.refused.append(what)
        self.send_error(403, "only the package registries")

    def do_CONNECT(self):
        host, _, port = self.path.rpartition(":")
        if host not in ALLOWED or port != "443":
            return self.refuse(self.path)
        try:
            upstream = socket.create_connection((host, 443), timeout=30)
        except OSError:
            return self.send_error(502)
        self.send_response(200, "Connection established")
        self.end_headers()
        sockets = [self.connection, upstream]
        try:
            while True:
                ready, _, _ = select.select(sockets, [], [], 120)
                if not ready:
                    break
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is self.connection else self.connection).sendall(data)
        except OSError:
            pass
        finally:
            upstream.close()
            self.close_connection = True

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.scheme != "http" or url.hostname not in ALLOWED:
            return self.refuse(self.path)
        request = urllib.request.Request(self.path, headers={
            k: v for k, v in self.headers.items() if k.lower() in ("range", "if-modified-since")})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            resp = opener.open(request, timeout=60)
        except urllib.error.HTTPError as err:
            resp = err
        except OSError:
            return self.send_error(502)
        with resp:
            body = resp.read()
            self.send_response(resp.status)
            for key in ("Content-Type", "Last-Modified", "Content-Range"):
                if resp.headers.get(key):
                    self.send_header(key, resp.headers[key])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


# Machines: a fresh root, its own namespaces ##################################################

class Machine:
    """A fresh Debian root in netns `name`: `unshare --mount --pid --fork` holds a pid 1 that
    has mounted /proc, /dev, /run and /tmp and chrooted into the root; commands enter it with
    nsenter (mount, pid and network namespaces, its root). Killing pid 1 ends everything
    inside, and the mounts go with the mount namespace."""

    def __init__(self, lab, name, index, tarball, workdir):
        self.lab, self.name = lab, name
        self.root = workdir / name
        self.root.mkdir()
        subprocess.run(["tar", "-C", str(self.root), "--numeric-owner", "-xf", str(tarball)],
                       check=True, timeout=300)
        self.address = lab.add_host(name, index)
        boot = ('set -e; r=$1; hostname "$2"; mount -t proc proc "$r/proc"; '
                'mount --rbind /dev "$r/dev"; mount -t tmpfs -o mode=755 tmpfs "$r/run"; '
                'mount -t tmpfs tmpfs "$r/tmp"; '
                'chmod 1777 "$r/tmp"; exec chroot "$r" /bin/sh -c '
                '"trap \'exit 0\' TERM; while :; do sleep 3600 & wait; done"')
        self.unshare = subprocess.Popen(lab.exec_args(
            name, "unshare", "--mount", "--pid", "--uts", "--fork", "--propagation", "private",
            "/bin/sh", "-c", boot, "boot", str(self.root), name))
        self.pid = None
        wait_until(self._booted, timeout=20, what=f"{name} to boot")

    def _booted(self):
        assert self.unshare.poll() is None, f"{self.name} did not boot"
        children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
        pids = children.read_text().split() if children.exists() else []
        if not pids:
            return False
        root = os.readlink(f"/proc/{pids[0]}/root")
        if root != str(self.root):
            return False
        self.pid = int(pids[0])
        return True

    def argv(self, command):
        return ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "-u", "-r", "-w", "--",
                "/usr/bin/env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8",
                "TERM=dumb", "/bin/bash", "-c", command]

    def sh(self, command, input=None, timeout=900, check=True):
        """Run `command` in the machine; returns its output (stdout and stderr)."""
        proc = subprocess.run(self.argv(command), input=input, capture_output=True, text=True,
                              timeout=timeout)
        out = proc.stdout + proc.stderr
        if check:
            assert proc.returncode == 0, f"{self.name}$ {command}\n{out[-6000:]}"
        return out

    def start(self, command, log_path):
        log = open(log_path, "ab")
        proc = subprocess.Popen(self.argv(command), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        log.close()
        return proc

    def write(self, path, text, mode=0o644):
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def close(self):
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)       # pid 1 of the namespace: all inside go
        stop_process(self.unshare)


# The test's CA and pebble #####################################################################

def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(directory, names):
    """A test CA (ca.pem) and a leaf for `names` (leaf.pem, leaf.key)."""
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=kokoa journey test CA", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={names[0]}",
            "-keyout", str(d / "leaf.key"), "-out", str(d / "leaf.csr"))
    (d / "ext.cnf").write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n")
    openssl("x509", "-req", "-in", str(d / "leaf.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
            str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(d / "ext.cnf"),
            "-out", str(d / "leaf.pem"))
    return d / "ca.pem"


TLS_FRONT = """daemon off; worker_processes 1; error_log {p}/error.log; pid {p}/nginx.pid;
events {{}}
http {{
    access_log off;
    client_body_temp_path {p}/t1; proxy_temp_path {p}/t2; fastcgi_temp_path {p}/t3;
    uwsgi_temp_path {p}/t4; scgi_temp_path {p}/t5;
    server {{
        listen 443 ssl; server_name kokoa.{domain};
        ssl_certificate {p}/leaf.pem; ssl_certificate_key {p}/leaf.key;
        location / {{ proxy_pass http://127.0.0.1:8080; proxy_set_header Host $host; }}
    }}
}}
"""


# The journey #################################################################################

class Clock:
    def __init__(self):
        self.start = time.monotonic()
        self.marks = []

    def mark(self, what):
        self.marks.append((what, time.monotonic() - self.start))


def typed(machine, line, clock, what, secret=None, milestones=(), timeout=900):
    """The user pastes `line` (and, when asked, the secret); returns the output. The clock
    marks each (pattern, label) of `milestones` when the first output line matches it."""
    proc = subprocess.Popen(machine.argv(line), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    pending = list(milestones)
    lines = []
    try:
        proc.stdin.write((secret + "\n") if secret else "")
        proc.stdin.close()
        for output_line in proc.stdout:
            lines.append(output_line)
            for pattern, label in list(pending):
                if pattern in output_line:
                    clock.mark(label)
                    pending.remove((pattern, label))
        proc.wait()
    finally:
        watchdog.cancel()
    out = "".join(lines)
    assert proc.returncode == 0, f"{machine.name}$ {line}\n{out[-6000:]}"
    clock.mark(what)
    return out


def admin(cp, password, method, path, body=None):
    """What the UI does for the admin (a click), as the same API call."""
    config = f'user = "admin:{password}"\n'
    data = ["--data-binary", json.dumps(body), "-H", "Content-Type: application/json"] \
        if body is not None else []
    proc = subprocess.run(
        ["ip", "netns", "exec", cp.lab.netns(cp.name), "curl", "-sS", "--fail-with-body",
         "-K", "-", "-X", method, *data, f"http://127.0.0.1:8080/api/v1{path}"],
        input=config, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout) if proc.stdout else None


@pytest.fixture
def world(tmp_path, debian_tarball):
    require_root()
    require_tools("unshare", "nsenter", "chroot", "pebble", "pebble-challtestsrv", "nginx",
                  "wireguard-go", "openssl", "curl")
    lab = NetLab()
    machines, procs, state = [], [], {}
    try:
        yield lab, machines, procs, state, tmp_path
    finally:
        for proc in procs:
            stop_process(proc)
        for machine in machines:
            machine.close()
        if "proxy" in state:
            state["proxy"].shutdown()
            state["proxy"].server_close()
        lab.close()
        for machine in machines:
            shutil.rmtree(machine.root, ignore_errors=True)


def test_from_nothing_to_https_in_four_pastes(world, debian_tarball, capsys):
    lab, machines, procs, state, tmp = world
    control_line, edge_line, origin_line = walkthrough_blocks()

    # Machine setup (not typed): the proxy on the host side of a veth to the bridge.
    proxy_ip = "198.18.0.254"
    veth = f"{lab.tag}px"
    subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", f"{lab.tag}pxh",
                    "netns", lab.hub], check=True)
    subprocess.run(["ip", "-n", lab.hub, "link", "set", f"{lab.tag}pxh", "master", "br0", "up"],
                   check=True)
    subprocess.run(["ip", "addr", "add", f"{proxy_ip}/24", "dev", veth], check=True)
    subprocess.run(["ip", "link", "set", veth, "up"], check=True)
    proxy = state["proxy"] = RegistryProxy((proxy_ip, 0))
    proxy_url = f"http://{proxy_ip}:{proxy.server_address[1]}"

    names = {"cp": 1, "edge": 2, "origin": 3}
    cp, edge, origin = (Machine(lab, name, index, debian_tarball, tmp)
                        for name, index in names.items())
    machines.extend([cp, edge, origin])
    acme_ip, client_ip = lab.add_host("acme", 4), lab.add_host("client", 5)
    assert client_ip
    hosts = (f"127.0.0.1 localhost cp edge origin\n{cp.address} kokoa.{DOMAIN}\n"
             f"{edge.address} edge1.{DOMAIN} app.{DOMAIN}\n{acme_ip} acme.{DOMAIN}\n")
    ca = make_ca(tmp / "ca", [f"kokoa.{DOMAIN}"])
    setup_started = time.monotonic()
    for machine in machines:
        machine.write("/etc/hosts", hosts)
        machine.write("/etc/hostname", machine.name + "\n")
        machine.write("/etc/apt/apt.conf.d/00kokoa-proxy",
                      f'Acquire::http::Proxy "{proxy_url}";\n')
        # This network reaches PyPI through a TLS-inspecting gateway: the roots trust its CA
        # for pip as the host does (the host's own pip.conf names this bundle).
        machine.write("/etc/kokoa-registry-ca.pem",
                      Path("/etc/ssl/certs/ca-certificates.crt").read_text())
        machine.write("/etc/pip.conf", f"[global]\nproxy = {proxy_url}\n"
                      "cert = /etc/kokoa-registry-ca.pem\n")
        machine.write("/usr/local/share/ca-certificates/kokoa-test-ca.crt", ca.read_text())
    for machine in (edge, origin):
        # A cloud image's sudo, curl and CA store; wireguard-go where the kernel module lacks.
        machine.sh("apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                   "--no-install-recommends sudo curl ca-certificates && update-ca-certificates")
        shutil.copy("/usr/bin/wireguard-go", machine.root / "usr/bin/wireguard-go")
    setup_s = time.monotonic() - setup_started

    # pebble, in its own namespace; the edge's ACME directory (machine setup, in edge.env).
    pebble_dir = make_ca(tmp / "pebble", [f"acme.{DOMAIN}"]).parent
    (pebble_dir / "pebble.json").write_text(json.dumps({"pebble": {
        "listenAddress": "0.0.0.0:14000", "managementListenAddress": "127.0.0.1:15000",
        "certificate": str(pebble_dir / "leaf.pem"), "privateKey": str(pebble_dir / "leaf.key"),
        "httpPort": 80, "tlsPort": 5001, "ocspResponderURL": "",
        "externalAccountBindingRequired": False}}))
    log = open(tmp / "pebble.log", "ab")
    procs.append(subprocess.Popen(lab.exec_args(
        "acme", "pebble-challtestsrv", "-dns01", "127.0.0.1:8053", "-http01", "",
        "-https01", "", "-tlsalpn01", "", "-management", "127.0.0.1:8055",
        "-defaultIPv4", edge.address, "-defaultIPv6", ""), stdout=log, stderr=log))
    procs.append(subprocess.Popen(lab.exec_args(
        "acme", "pebble", "-config", str(pebble_dir / "pebble.json"), "-dnsserver",
        "127.0.0.1:8053", "-strict=false"), stdout=log, stderr=log,
        env={**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}))
    log.close()

    def pebble_root():
        proc = subprocess.run(lab.exec_args("acme", "curl", "-sf", "-k", "--max-time", "5",
                                            "https://127.0.0.1:15000/roots/0"),
                              capture_output=True, timeout=10)
        return proc.stdout if proc.returncode == 0 else None
    wait_until(pebble_root, timeout=30, what="pebble")
    (tmp / "acme-root.pem").write_bytes(pebble_root())
    edge.write("/etc/kokoa/acme-ca.pem", (pebble_dir / "ca.pem").read_text())
    edge.write("/etc/kokoa/edge.env", f"ACME_SERVER=https://acme.{DOMAIN}:14000/dir\n"
               "ACME_CA_BUNDLE=/etc/kokoa/acme-ca.pem\n", mode=0o600)

    # The origin's app (the user's service, already running), and the control plane's TLS front.
    (tmp / "site").mkdir()
    (tmp / "site/index.html").write_text("hello from home\n")
    procs.append(subprocess.Popen(lab.exec_args(
        "origin", "python3", "-m", "http.server", "-b", "0.0.0.0", "-d", str(tmp / "site"),
        "8080"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    front = tmp / "front"
    front.mkdir()
    for name in ("leaf.pem", "leaf.key"):
        shutil.copy(tmp / "ca" / name, front / name)
    (front / "nginx.conf").write_text(TLS_FRONT.format(p=front, domain=DOMAIN))
    procs.append(subprocess.Popen(lab.exec_args("cp", "nginx", "-p", str(front), "-c",
                                                str(front / "nginx.conf")),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    checkout = cp.root / "root/kokoa"                 # the user's `git clone`
    checkout.mkdir(parents=True)
    for name in CHECKOUT:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, checkout / name)
        else:
            shutil.copy(source, checkout / name)

    # The journey: from here on, only what the user types (and clicks, done as the UI's calls).
    clock = Clock()
    commands = 0
    serve = cp.start("cd /root/kokoa && " + control_line.replace("\n", " && "),
                     tmp / "control-plane.log")
    procs.append(serve)
    commands += len(control_line.splitlines())

    def cp_up():
        assert serve.poll() is None, (tmp / "control-plane.log").read_text()[-4000:]
        if not clock.marks and (checkout / "kokoa.env").exists():
            clock.mark("control plane: apt python3-venv, venv, pip install, init")
        return "ok" in edge.sh(f"curl -sf https://kokoa.{DOMAIN}/healthz", check=False)
    wait_until(cp_up, timeout=900, interval=1, what="the control plane over verified https")
    clock.mark("control plane serving over verified https")
    env_text = (checkout / "kokoa.env").read_text()
    password = re.search(r"^KOKOA_ADMIN_PASSWORD=(.*)$", env_text, re.M).group(1)
    assert f"KOKOA_PUBLIC_URL=https://kokoa.{DOMAIN}" in env_text

    clicks = 0
    key = admin(cp, password, "POST", "/enrollment-keys", {"description": "edge1"})["key"]
    clicks += 1
    edge_out = typed(edge, edge_line, clock, "edge: first poll applied, edge1's certificate, "
                     "installer done", secret=key, milestones=[
                         ("installed packages:", "edge: apt (nginx, certbot, wireguard, jq)"),
                         ("registered this edge", "edge: agent fetched and checked, registered"),
                         ("started nginx", "edge: wireguard up, nginx started")])
    commands += 1
    assert key not in edge_out
    home = admin(cp, password, "POST", "/origins", {"name": "home"})
    token = admin(cp, password, "POST", f"/origins/{home['id']}/token", {})["token"]
    clicks += 2
    origin_out = typed(origin, origin_line, clock, "origin: tunnel up, refresh scheduled",
                       secret=token, milestones=[
                           ("wrote /etc/wireguard", "origin: apt (wireguard-tools), config")])
    commands += 1
    assert token not in origin_out
    admin(cp, password, "POST", "/routes", {"hostname": f"app.{DOMAIN}",
                                            "origin_id": home["id"], "target_port": 8080})
    clicks += 1
    clock.mark("route added")

    def served(*trust):
        proc = subprocess.run(lab.exec_args(
            "client", "curl", "-sS", "--max-time", "5", *trust,
            "--resolve", f"app.{DOMAIN}:443:{edge.address}", f"https://app.{DOMAIN}/"),
            capture_output=True, text=True, timeout=15)
        return proc.returncode == 0 and proc.stdout == "hello from home\n"
    wait_until(lambda: served("--insecure"), timeout=300, interval=0.5,
               what="the route through the tunnel (fallback certificate)")
    clock.mark("edge polled: route served through the tunnel (fallback certificate)")
    served = functools.partial(served, "--cacert", str(tmp / "acme-root.pem"))
    wait_until(served, timeout=300, interval=1, what="https://app.example.test/ with its cert")
    clock.mark("first 200 over https with a real certificate")

    schedule = edge.sh("ls /etc/cron.d /etc/systemd/system 2>/dev/null; "
                       "tail -n 3 /var/log/kokoa-edge-agent.log", check=False)
    loop = "started the agent loop" in edge_out
    with capsys.disabled():
        print(f"\njourney: {commands} commands typed, {clicks} UI actions, "
              f"{clock.marks[-1][1]:.0f} s from empty machines to the first 200 over https "
              f"(machine setup before it: {setup_s:.0f} s)")
        previous = 0.0
        for what, at in clock.marks:
            print(f"  {at:6.1f} s  (+{at - previous:5.1f})  {what}")
            previous = at
        print(f"  edge agent scheduled by: {'loop (no systemd, no cron)' if loop else schedule}")
        print(f"  origin refresh: {'loop' if 'refresh loop' in origin_out else origin_out[-300:]}")
        print(f"  proxy refused: {proxy.refused or 'nothing'}")
    assert commands <= 4
    assert loop, edge_out[-3000:]
