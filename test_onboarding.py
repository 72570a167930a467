"""What a new user trips over, and the installers the control plane serves (issue 17)."""

import re
import subprocess
import time

import pytest

import kokoa
from conftest import REPO, run_cli, wg_keypair


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
