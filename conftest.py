"""Shared pytest fixtures and helpers for the Kokoa suite.

Tests that need root or an external tool call `require_tools()` / `require_root()`: they skip
when the tool is absent, except under KOKOA_REQUIRE_E2E=1 (set by .ci/run), where they fail.
The control plane runs here as a real `kokoa.py serve` (KokoaServer) or in-process under
waitress (InProcessServer); real processes around the edge live in netlab.py, which imports
this module (so this one never imports netlab).
"""

import base64
import contextlib
import datetime
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from wsgiref.validate import validator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import kokoa

REPO = Path(__file__).resolve().parent
REQUIRE_E2E = os.environ.get("KOKOA_REQUIRE_E2E") == "1"

# Suite-wide secret audit: every secret the tests make or receive is remembered, every line
# the control plane logs (in-process, and each `kokoa.py serve`'s output) is kept, and the
# session fails if any secret shows up in any log line.
SECRETS = set()
LOG_LINES = []


class _LogCapture(logging.Handler):
    def emit(self, record):
        LOG_LINES.append(self.format(record))


def remember_secret(*values):
    """Note values that must never appear in a log."""
    SECRETS.update(v for v in values if isinstance(v, str) and len(v) >= 16)


def pytest_sessionstart(session):
    handler = _LogCapture(logging.DEBUG)
    handler.setFormatter(kokoa.JsonLogFormatter())
    logger = logging.getLogger("kokoa")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def pytest_sessionfinish(session, exitstatus):
    leaked = sorted({s for s in SECRETS for line in LOG_LINES if s in line})
    if leaked:
        print(f"\nSECRET AUDIT: {len(leaked)} secret(s) appear in control plane logs, e.g. "
              f"{leaked[0][:6]}...", file=sys.stderr)
        session.exitstatus = 1
    elif SECRETS:
        print(f"\nsecret audit: {len(SECRETS)} secrets, none in {len(LOG_LINES)} log lines",
              file=sys.stderr)


def require(condition, reason):
    """Skip the test when `condition` is false, or fail it under KOKOA_REQUIRE_E2E=1."""
    if condition:
        return
    if REQUIRE_E2E:
        pytest.fail(f"{reason} (KOKOA_REQUIRE_E2E=1 forbids skipping)")
    pytest.skip(reason)


def require_tools(*names):
    """Require every named executable on PATH (or an absolute path that exists)."""
    missing = [n for n in names if shutil.which(n) is None]
    require(not missing, f"missing tools: {', '.join(missing)}")


def require_root():
    """Require uid 0 (network namespaces, binding privileged things)."""
    require(os.geteuid() == 0, "needs root")


def free_port(host="127.0.0.1"):
    """Return a TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout=15.0, interval=0.05, what="condition"):
    """Poll `predicate` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http_ok(url, timeout=2.0):
    """True if GET url answers 200 now (False on any connection error)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def send_request(url, method, path, body=b"", headers=None, source="127.0.0.1", timeout=20):
    """One request with http.client from a chosen loopback source; (status, headers, bytes)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def send_json(server, method, path, headers=None, body=None, source="127.0.0.1"):
    """send_request with a JSON body (if any): (status, headers, parsed JSON or None)."""
    hdrs = dict(headers or {})
    data = b""
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    status, got, raw = send_request(server.url, method, path, data, hdrs, source)
    return status, got, json.loads(raw) if raw.startswith(b"{") else None


def stop_process(proc, timeout=10.0):
    """Terminate a Popen (then kill it) and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ...
    (utime and stime are [11] and [12])."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid, thread=None):
    """User + system CPU time of process `pid` (or of its thread `thread`) so far, in s."""
    fields = proc_stat(pid if thread is None else f"{pid}/task/{thread}")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kill_session(leader_pid):
    """SIGKILL every process of the session `leader_pid` leads (a Popen started with
    start_new_session=True): its process group and the groups its children made (timeout(1)
    makes its own, so killpg leaves the command it runs behind)."""
    for _ in range(5):      # a process may fork while we look
        members = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                fields = proc_stat(entry.name)
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == leader_pid:   # state ppid pgrp sid
                members.append(int(entry.name))
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    raise AssertionError(f"processes of session {leader_pid} outlived SIGKILL: {members}")


def basic_auth(user, password):
    """An `Authorization: Basic` header value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class ApiClient:
    """Calls a Kokoa control plane at `url` as admin, as an edge, or anonymously."""

    def __init__(self, url, admin_user, admin_password, bootstrap_token):
        self.url = url
        self.admin_user = admin_user
        self.admin_password = admin_password
        self.bootstrap_token = bootstrap_token

    def request(self, method, path, body=None, headers=None, auth="admin"):
        """Send a request; return (status, headers, parsed JSON or raw bytes).

        auth is "admin" (Basic), None (nothing) or a node token (Bearer).
        """
        hdrs = dict(headers or {})
        if auth == "admin":
            hdrs["Authorization"] = basic_auth(self.admin_user, self.admin_password)
        elif auth:
            hdrs["Authorization"] = f"Bearer {auth}"
        data = None
        remember_request_secrets(body)
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                answer = resp.status, resp.headers, _decode(resp.read(), resp.headers)
        except urllib.error.HTTPError as err:
            answer = err.code, err.headers, _decode(err.read(), err.headers)
        remember_response_secrets(answer[2])
        return answer

    def register_edge(self, name, **fields):
        """Register an edge with the bootstrap token; return (id, node token)."""
        body = {"bootstrap_token": self.bootstrap_token, "name": name, **fields}
        status, _, data = self.request("POST", "/api/v1/edge-nodes/register", body, auth=None)
        assert status == 201, data
        return data["id"], data["token"]


def run_cli(*args, cwd, env=None, timeout=60):
    """`python kokoa.py ARGS` in `cwd`, with no KOKOA_/WIREGUARD_ variables but `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KOKOA_", "WIREGUARD_"))}
    return subprocess.run([sys.executable, str(REPO / "kokoa.py"), *args], cwd=cwd,
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def fresh_secrets():
    """(encryption key hex, bootstrap token, admin password) for a test control plane."""
    values = (os.urandom(32).hex(),
              base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("="),
              base64.urlsafe_b64encode(os.urandom(18)).decode())
    remember_secret(*values)
    return values


class KokoaServer(ApiClient):
    """A real `python kokoa.py serve` subprocess on a loopback port."""

    def __init__(self, workdir, env_overrides=None):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.db = self.workdir / "kokoa.db"
        self.secret, bootstrap_token, admin_password = fresh_secrets()
        super().__init__(f"http://127.0.0.1:{self.port}", "admin", admin_password,
                         bootstrap_token)
        self.env = dict(os.environ)
        self.env.update({
            "WIREGUARD_KEY_ENC_SECRET": self.secret,
            "KOKOA_BOOTSTRAP_TOKEN": self.bootstrap_token,
            "KOKOA_ADMIN_USER": self.admin_user,
            "KOKOA_ADMIN_PASSWORD": self.admin_password,
        })
        self.env.update(env_overrides or {})
        self.log_path = self.workdir / "kokoa-serve.log"
        self.extra_args = []
        self.proc = None

    def start(self):
        """Start the server and wait until /healthz answers."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "kokoa.py"), "serve",
             "--listen", f"127.0.0.1:{self.port}", "--db", str(self.db), *self.extra_args],
            cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self._healthy, timeout=20, what="kokoa /healthz")
        return self

    def _healthy(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"kokoa exited early:\n{self.log_path.read_text()}")
        return http_ok(self.url + "/healthz")

    def stop(self):
        """Stop the server process; its output joins the suite's secret audit."""
        if self.proc is not None:
            stop_process(self.proc)
            if self.log_path.exists():
                LOG_LINES.extend(self.log_path.read_text(errors="replace").splitlines())


def remember_request_secrets(body):
    """The passwords and password hashes an access policy's users carry."""
    users = body.get("users") if isinstance(body, dict) else None
    for user in users if isinstance(users, list) else ():
        if isinstance(user, dict):
            remember_secret(user.get("password"), user.get("password_hash"))


def remember_response_secrets(body):
    """Node tokens, enrollment keys and WireGuard private keys the API hands out."""
    if isinstance(body, dict):
        remember_secret(body.get("token"), body.get("key"))
    elif isinstance(body, bytes) and b"PrivateKey = " in body:
        remember_secret(*(line.split(" = ", 1)[1] for line in body.decode().splitlines()
                          if line.startswith("PrivateKey = ")))


def _decode(raw, headers):
    if (headers.get("Content-Type") or "").startswith("application/json") and raw:
        return json.loads(raw)
    return raw


def edited_backup(db_path, target, *statements):
    """A real backup of the database at `db_path` in `target`, then changed by hand with
    `statements` (as a crafted backup would be: foreign keys are not enforced)."""
    kokoa.backup_database(str(db_path), str(target))
    db = sqlite3.connect(target, isolation_level=None)
    try:
        for statement in statements:
            db.execute(statement)
    finally:
        db.close()
    return target


def make_config(db_path, **overrides):
    """A kokoa.Config on `db_path` with fresh secrets (remembered for the audit)."""
    key, bootstrap, password = fresh_secrets()
    values = {"db_path": str(db_path), "keyring": kokoa.Keyring(bytes.fromhex(key)),
              "bootstrap_token": bootstrap, "admin_password": password}
    values.update(overrides)
    return kokoa.Config(**values)


def migrated_app(config):
    """Migrate the config's database as `serve` does, then wire the WSGI app."""
    kokoa.open_migrated(config.db_path)
    return kokoa.make_app(config)


class InProcessServer(ApiClient):
    """kokoa.make_app under waitress in a thread, wrapped in wsgiref's validator."""

    def __init__(self, config):
        # Imported here, not at the top: netlab and the benches import this module without it.
        import waitress
        self.config = config
        self.app = migrated_app(config)
        self.server = waitress.create_server(validator(self.app), host="127.0.0.1", port=0,
                                             threads=4, asyncore_use_poll=True,
                                             asyncore_loop_timeout=0.05,
                                             **kokoa.WAITRESS_SETTINGS)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        super().__init__(f"http://127.0.0.1:{self.server.effective_port}", config.admin_user,
                         config.admin_password, config.bootstrap_token)

    def close(self):
        self.server.close()
        self.server.task_dispatcher.shutdown(timeout=5)
        self.thread.join(timeout=5)
        self.app.close()

    def rows(self, sql, params=()):
        db = kokoa.connect(self.config.db_path)
        try:
            return [tuple(row) for row in db.execute(sql, params)]
        finally:
            db.close()

    def snapshot(self):
        """Every row of every table, to prove that a rejected request changed nothing."""
        return {table: self.rows(f"SELECT * FROM {table} ORDER BY 1")
                for table in ("origins", "routes", "edge_nodes", "settings", "access_policies")}

    def create_origin(self, name="home", wg_ip="10.8.0.2", **fields):
        """POST an origin (wg_ip=None leaves the address to the control plane)."""
        address = {} if wg_ip is None else {"wg_ip": wg_ip}
        status, _, body = self.request("POST", "/api/v1/origins",
                                       {"name": name, **address, **fields})
        assert status == 201, body
        return body

    def create_route(self, hostname, origin_id, port=8080):
        status, _, body = self.request("POST", "/api/v1/routes", {
            "hostname": hostname, "origin_id": origin_id, "target_port": port})
        assert status == 201, body
        return body

    def my_config(self, token, etag=None):
        headers = {"If-None-Match": etag} if etag else {}
        return self.request("GET", "/api/v1/edge-nodes/me/config", headers=headers, auth=token)


def wg_keypair():
    """(private, public) base64 WireGuard keys made by kokoa; the private one is remembered."""
    private = kokoa.wg_generate_private()
    remember_secret(kokoa.b64(private))
    return kokoa.b64(private), kokoa.b64(kokoa.wg_public_from_private(private))


def write_nginx_prefix(prefix, map_text, port):
    """A private nginx instance whose only server proxies to $kokoa_backend."""
    for sub in ("conf", "logs", "run", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    (prefix / "conf" / "map.conf").write_text(map_text)
    temp_paths = "".join(f"    {name}_temp_path {prefix}/tmp/{name};\n"
                         for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (prefix / "conf" / "nginx.conf").write_text(f"""
error_log {prefix}/logs/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
{temp_paths}    include {prefix}/conf/map.conf;
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://$kokoa_backend; }}
    }}
}}
""")


def nginx_test(prefix):
    """`nginx -t` on the instance write_nginx_prefix() made; the CompletedProcess."""
    return subprocess.run(
        ["nginx", "-t", "-p", f"{prefix}/", "-c", "conf/nginx.conf",
         "-g", f"pid {prefix}/run/nginx.pid;"], capture_output=True, text=True, timeout=60)


@pytest.fixture
def api(tmp_path):
    """A control plane in this process (InProcessServer) on a fresh database."""
    server = InProcessServer(make_config(tmp_path / "kokoa.db"))
    yield server
    server.close()


@pytest.fixture
def kokoa_server(tmp_path):
    """A running control plane (function scope) in a fresh directory."""
    server = KokoaServer(tmp_path).start()
    yield server
    server.stop()


# The agent's own hostname grammar (STYLE J1: tests use it, never a copy of it) ################

_AGENT_HOST_VERDICTS = {}


def agent_jq(name, script_text=None):
    """The jq program agent.sh holds in its `read -r -d '' NAME <<'JQ'` heredoc, read out of
    agent.sh itself (or out of `script_text`, another version of it); '' if there is none."""
    text = (REPO / "agent.sh").read_text() if script_text is None else script_text
    _, found, rest = text.partition(f"read -r -d '' {name} <<'JQ' || true\n")
    body, closed, _ = rest.partition("\nJQ\n")
    return body + "\n" if found and closed else ""


def agent_common_jq():
    """The jq definitions agent.sh shares between its jq programs (COMMON_JQ, with
    `def is_host:`)."""
    text = agent_jq("COMMON_JQ")
    assert "def is_host:" in text, "agent.sh has no COMMON_JQ with is_host"
    return text


def agent_is_host(names):
    """The agent's jq `is_host` verdict on each name; the names go to jq as JSON, as a payload's
    do. Verdicts are remembered, so property tests can ask often."""
    todo = sorted({name for name in names if name not in _AGENT_HOST_VERDICTS})
    if todo:
        out = subprocess.run(["jq", "-c", agent_common_jq() + "map(is_host)"],
                             input=json.dumps(todo), capture_output=True, text=True,
                             timeout=60, check=True).stdout
        _AGENT_HOST_VERDICTS.update(zip(todo, json.loads(out), strict=True))
    return [_AGENT_HOST_VERDICTS[name] for name in names]


# The edge under test (netlab.py's processes; netlab imports this module, so it is imported
# inside the fixtures) ########################################################################

@pytest.fixture
def workdir():
    """A temporary directory that nginx workers (nobody) can traverse."""
    path = Path(tempfile.mkdtemp(prefix="kokoa-edge-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def double():
    """A control-plane double (netlab.ControlPlaneDouble) on loopback."""
    from netlab import ControlPlaneDouble
    cp = ControlPlaneDouble()
    yield cp
    cp.close()


@pytest.fixture(scope="module")
def backend_net():
    """A namespace whose private address the tests' HTTP backends listen on."""
    from netlab import BackendNet
    require_tools("ip")
    require(os.geteuid() == 0, "needs root for a network namespace")
    net = BackendNet().start()
    yield net
    net.stop()


@pytest.fixture
def edge(workdir, double):
    """An edge (private nginx + agent settings) pointed at the double, nginx running."""
    from netlab import Edge
    require_tools("nginx", "curl", "jq", "flock", "openssl")
    e = Edge(workdir, double.url)
    e.nginx.start()
    yield e
    e.nginx.stop()


@pytest.fixture(scope="session")
def debian_tarball(tmp_path_factory):
    """A fresh Debian 12 root file system (`mmdebstrap --variant=apt`, from the Debian
    registry) as a tarball: built once per test run, shared by the tests that need a new
    machine (the journey, the container base). Never kept between runs."""
    require_root()
    require_tools("mmdebstrap")
    target = tmp_path_factory.mktemp("debian") / "bookworm.tar"
    result = subprocess.run(["mmdebstrap", "--variant=apt", "--quiet", "bookworm", str(target)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return target


# Certificates (issue 15): what an edge uploads, made here rather than by a CA #################

def make_certificate(names, days=90, key=None, not_before=None):
    """(fullchain PEM, privkey PEM) of a self-signed certificate for `names` (the key is
    remembered for the suite's secret audit)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    start = not_before or now - datetime.timedelta(days=1)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    remember_secret(key_pem, "".join(key_pem.splitlines()[1:-1]))
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem
