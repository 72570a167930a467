"""What a new user trips over, and the installers the control plane serves (issue 17)."""

import hashlib
import os
import re
import subprocess
import time
import urllib.request

import pytest

import kokoa
from conftest import (
    REPO,
    InProcessServer,
    KokoaServer,
    make_config,
    require_tools,
    run_cli,
    wg_keypair,
)


def register(api, key, name, **fields):
    return api.request("POST", "/api/v1/edge-nodes/register",
                       {"bootstrap_token": key, "name": name, **fields}, auth=None)


# Enrollment keys say why they no longer work ##################################################

def test_a_used_up_enrollment_key_says_so(api):
    key = api.request("POST", "/api/v1/enrollment-keys", {"uses": 1})[2]["key"]
    assert register(api, key, "edge1")[0] == 201
    status, _, body = register(api, key, "edge2")
    assert status == 401
    assert body["error"]["field"] == "bootstrap_token"
    assert "this enrollment key is used up" in body["error"]["message"]


def test_an_expired_enrollment_key_says_so(api):
    key = api.request("POST", "/api/v1/enrollment-keys", {})[2]["key"]
    db = kokoa.connect(api.config.db_path)
    try:
        db.execute("UPDATE enrollment_keys SET expires_at = ?",
                   (kokoa.iso_time(time.time() - 5),))
    finally:
        db.close()
    status, _, body = register(api, key, "edge1")
    assert status == 401
    assert "has expired" in body["error"]["message"]
    assert "used up" not in body["error"]["message"]


@pytest.mark.parametrize("guess", [
    kokoa.ENROLLMENT_KEY_PREFIX + "A" * 43,      # the shape of a key, but never issued
    "wrong", kokoa.ENROLLMENT_KEY_PREFIX])
def test_a_guessed_key_learns_only_that_it_is_wrong(api, guess):
    """Used up and expired are told only for a key whose hash is stored: no oracle."""
    used = api.request("POST", "/api/v1/enrollment-keys", {"uses": 1})[2]["key"]
    assert register(api, used, "edge1")[0] == 201
    status, _, body = register(api, guess, "edge2")
    assert status == 401
    assert body["error"]["message"] == "wrong bootstrap token or enrollment key"


# Edges that origins leave out of their tunnels ################################################

def test_an_edge_without_address_or_key_carries_a_warning(api):
    _, public = wg_keypair()
    assert register(api, api.bootstrap_token, "bare")[0] == 201
    assert register(api, api.bootstrap_token, "full", wg_public_key=public,
                    wg_ip="10.8.0.9")[0] == 201
    edges = {e["name"]: e for e in api.request("GET", "/api/v1/edge-nodes")[2]["edge_nodes"]}
    assert edges["full"]["warnings"] == []
    (warning,) = edges["bare"]["warnings"]
    assert "wg_ip" in warning and "public key" in warning
    assert "leave this edge out of their wireguard.conf" in warning
    origin = api.create_origin()
    conf = api.request("GET", f"/api/v1/origins/{origin['id']}/wireguard.conf")[2].decode()
    assert '"full"' in conf and '"bare"' not in conf


def test_the_ui_shows_an_edge_warning():
    """The edge list renders `warnings` (the words in full, not only a badge)."""
    app = (REPO / "static/app.js").read_text()
    assert "edge.warnings" in app and "edgeWarnings(edge)" in app


# One WireGuard key per peer, across origins and edges ########################################

def test_an_origin_may_not_reuse_an_edge_key(api):
    _, public = wg_keypair()
    assert register(api, api.bootstrap_token, "edge1", wg_public_key=public,
                    wg_ip="10.8.0.9")[0] == 201
    status, _, body = api.request("POST", "/api/v1/origins", {
        "name": "home", "wg_ip": "10.8.0.2", "wg_public_key": public})
    assert status == 409 and body["error"]["field"] == "wg_public_key"
    assert "an edge" in body["error"]["message"]
    origin = api.create_origin()
    status, _, body = api.request("PATCH", f"/api/v1/origins/{origin['id']}",
                                  {"wg_public_key": public, "wg_private_key": None})
    assert status == 409 and body["error"]["field"] == "wg_public_key"


def test_an_edge_may_not_reuse_an_origin_key(api):
    origin = api.create_origin()
    status, _, body = register(api, api.bootstrap_token, "edge1",
                               wg_public_key=origin["wg_public_key"], wg_ip="10.8.0.9")
    assert status == 409 and body["error"]["field"] == "wg_public_key"
    assert "an origin" in body["error"]["message"]
    assert api.request("GET", "/api/v1/edge-nodes")[2]["edge_nodes"] == []


# The CLI tells the truth #####################################################################

def test_init_help_says_it_writes_the_env_file(tmp_path):
    result = run_cli("init", "--help", cwd=tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "file to write" in text and "file to read" not in text


def test_init_names_the_interpreter_that_has_the_packages(tmp_path):
    result = run_cli("init", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{kokoa.python_command()} serve".split()[0] in result.stdout
    assert "python kokoa.py" not in result.stdout
    assert re.search(r"start the control plane: +\S*python\S* \S*kokoa\.py serve", result.stdout)


def test_init_takes_the_public_url_from_the_environment(tmp_path):
    result = run_cli("init", cwd=tmp_path, env={"KOKOA_PUBLIC_URL": "https://cp.example.net"})
    assert result.returncode == 0, result.stderr
    assert "\nKOKOA_PUBLIC_URL=https://cp.example.net\n" in (tmp_path / "kokoa.env").read_text()
    bad = run_cli("init", "--env-file", "other.env", cwd=tmp_path,
                  env={"KOKOA_PUBLIC_URL": "https://cp.example.net/x'$(id)"})
    assert bad.returncode == 2 and not (tmp_path / "other.env").exists()


# The README ##################################################################################

def test_one_timer_name_everywhere():
    install = (REPO / "install-edge.sh").read_text()
    assert "kokoa-edge-agent.timer" in install
    for path in ("README.md", "install-edge.sh", "agent.sh", "kokoa.py", "static/app.js",
                 "static/index.html"):
        assert "kokoa-agent." not in (REPO / path).read_text(), path


def test_the_quick_start_says_what_a_new_user_needs():
    text = (REPO / "README.md").read_text()
    quick = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    assert "git clone" in quick                      # where the checkout comes from
    assert "foreground" in quick                     # serve does not return
    assert "ssh -L 8080:127.0.0.1:8080" in quick     # a headless server's UI
    assert not re.search(r"(?<![/\w])python3? (kokoa|dns)\.py", text.replace(
        "python3 dns.py", "")), "only .venv/bin/python has kokoa's packages"


def test_the_readme_documents_the_status_certificates_and_applied_hash():
    text = (REPO / "README.md").read_text()
    assert '"certificates": {"<hostname>": {"status"' in text
    assert "without `applied_hash`" in text


def test_shell_scripts_pass_shellcheck():
    paths = [str(REPO / name) for name in ("install-edge.sh", "install-origin.sh")]
    result = subprocess.run(["shellcheck", "-x", "-o", "check-set-e-suppressed", *paths],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# The control plane serves its installers (one paste per machine) #############################

def fetch(url):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, resp.headers, resp.read()


def served_value(script, name):
    """What bash makes of the served script's `NAME=...` line."""
    line = next(line for line in script.splitlines() if line.startswith(f"{name}="))
    return subprocess.run(["bash", "-c", f'{line}\nprintf %s "${name}"'], capture_output=True,
                          text=True, check=True).stdout


@pytest.fixture
def public_api(tmp_path):
    server = InProcessServer(make_config(tmp_path / "kokoa.db",
                                         public_url="https://kokoa.example.test"))
    yield server
    server.close()


def test_the_installers_are_public_and_know_the_control_plane(public_api):
    status, headers, agent = fetch(public_api.url + "/install/agent.sh")
    assert status == 200 and agent == (REPO / "agent.sh").read_bytes()
    assert headers["X-Kokoa-Sha256"] == hashlib.sha256(agent).hexdigest()
    for name in ("edge.sh", "origin.sh"):
        status, headers, body = fetch(public_api.url + f"/install/{name}")
        assert status == 200 and headers["Content-Type"].startswith("text/x-shellscript")
        script = body.decode()
        assert served_value(script, "SERVED_CONTROL_PLANE") == "https://kokoa.example.test"
        assert subprocess.run(["bash", "-n"], input=body).returncode == 0
        assert public_api.bootstrap_token not in script
    edge = fetch(public_api.url + "/install/edge.sh")[2].decode()
    assert served_value(edge, "SERVED_AGENT_SHA256") == hashlib.sha256(agent).hexdigest()
    assert public_api.request("GET", "/install/install-edge.sh", auth=None)[0] == 404
    assert public_api.request("GET", "/install/..%2fkokoa.py", auth=None)[0] == 404


@pytest.mark.parametrize("url", [
    "https://[fe80::1%25$(touch${IFS}/tmp/kokoa-pwned)]",
    "https://kokoa.example.test:443'$(id)'",
    "https://kokoa.example.test/`id`",
    "https://kokoa.example.test\nid",
])
def test_a_crafted_public_url_never_becomes_shell(tmp_path, url):
    config = make_config(tmp_path / "kokoa.db", public_url=url)
    assert kokoa.installer_url(config) == ""
    body, _ = kokoa.served_installer(config, "edge.sh")
    assert served_value(body.decode(), "SERVED_CONTROL_PLANE") == ""


@pytest.mark.parametrize("value", ["a'b", "$(id)", "`id`", "x\ny", "\\'\"", ""])
def test_served_values_are_shell_quoted_whatever_they_hold(value):
    text = kokoa.fill_served("A=''\nB=''\n", {"A": value})
    shell = subprocess.run(["bash", "-c", text + 'printf %s "$A"'], capture_output=True,
                           text=True, check=True)
    assert shell.stdout == value and "\nB=''\n" in text


def test_the_served_edge_installer_fetches_the_agent_and_checks_its_hash(workdir):
    require_tools("jq", "curl", "openssl", "wg", "flock")
    (workdir / "kokoa").mkdir()
    port_server = KokoaServer(workdir / "kokoa")
    port_server.env["KOKOA_PUBLIC_URL"] = f"http://127.0.0.1:{port_server.port}"
    server = port_server.start()
    try:
        script = fetch(server.url + "/install/edge.sh")[2]
        env = {"PATH": os.environ["PATH"], "KOKOA_ENROLL_KEY": server.bootstrap_token}

        def install(text, root):
            (root / "etc/nginx").mkdir(parents=True)
            (root / "etc/nginx/nginx.conf").write_text("events {}\nhttp {\n}\n")
            return subprocess.run(
                ["bash", "-s", "--", "--root", str(root), "--no-packages", "--no-run",
                 "--email", "ops@example.com", "--name", root.name], input=text, cwd=workdir,
                env=env, capture_output=True, timeout=120)
        tampered = script.replace(b"SERVED_AGENT_SHA256=", b"SERVED_AGENT_SHA256=0", 1)
        bad = install(tampered, workdir / "bad")
        assert bad.returncode == 1 and b"nothing installed" in bad.stderr
        assert not (workdir / "bad/usr/local/bin/kokoa-edge-agent").exists()
        assert server.request("GET", "/api/v1/edge-nodes")[2]["edge_nodes"] == []
        good = install(script, workdir / "good")
        assert good.returncode == 0, good.stdout + good.stderr
        agent = workdir / "good/usr/local/bin/kokoa-edge-agent"
        assert agent.read_bytes() == (REPO / "agent.sh").read_bytes()
        settings = (workdir / "good/etc/kokoa/edge.env").read_text()
        assert f"CONTROL_PLANE_URL={server.url}\n" in settings
        assert server.bootstrap_token not in good.stdout.decode() + good.stderr.decode()
    finally:
        server.stop()


def test_the_served_origin_installer_uses_the_origin_token_and_keeps_fresh(workdir):
    require_tools("curl", "wg")
    (workdir / "kokoa").mkdir()
    port_server = KokoaServer(workdir / "kokoa", {"KOKOA_WG_NETWORK": "10.77.0.0/24"})
    port_server.env["KOKOA_PUBLIC_URL"] = f"http://127.0.0.1:{port_server.port}"
    server = port_server.start()
    try:
        origin = server.request("POST", "/api/v1/origins", {"name": "home"})[2]
        token = server.request("POST", f"/api/v1/origins/{origin['id']}/token", {})[2]["token"]
        _, public = wg_keypair()
        server.register_edge("edge1", wg_public_key=public)
        script = fetch(server.url + "/install/origin.sh")[2]
        root = workdir / "root"
        result = subprocess.run(
            ["bash", "-s", "--", "--root", str(root), "--no-packages"], input=script,
            cwd=workdir, env={"PATH": os.environ["PATH"], "KOKOA_ORIGIN_TOKEN": token},
            capture_output=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        conf = (root / "etc/wireguard/kokoa0.conf").read_text()
        assert f"PublicKey = {public}" in conf and "Address = 10.77.0.1/32" in conf
        stored = (root / "etc/kokoa/origin.env").read_text()
        assert f"KOKOA_ORIGIN_TOKEN={token}" in stored
        assert f"CONTROL_PLANE_URL={server.url}" in stored
        assert (root / "etc/kokoa/origin.env").stat().st_mode & 0o077 == 0
        assert (root / "usr/local/sbin/kokoa-install-origin").read_bytes() == script
        assert (root / "etc/systemd/system/kokoa-origin-refresh.timer").exists()
        assert token.encode() not in result.stdout + result.stderr
    finally:
        server.stop()


def test_the_ui_shows_both_one_line_commands_with_secrets_only_in_the_environment():
    app = (REPO / "static/app.js").read_text()
    assert "/install/edge.sh | sudo --preserve-env=KOKOA_ENROLL_KEY bash -s -- --email" in app
    assert "/install/origin.sh | sudo --preserve-env=KOKOA_ORIGIN_TOKEN bash -s" in app
    assert "read -rsp" in app and not re.search(r"KOKOA_(ENROLL_KEY|ORIGIN_TOKEN)=\$", app)
    assert "#origin-command" in app and 'id="origin-command"' in (
        REPO / "static/index.html").read_text()
