"""Access policies at the edge (issue 14, policy-contract.md): the real agent renders a schema-2
payload from the control-plane double for a real nginx, and real clients (curl, or a raw TLS
socket for WebSocket handshakes) check what clients and origins see.

Loopback only: clients come from 127.0.0.x (curl --interface) for allow and deny lists; the
origin and a small forward-auth verifier listen on a private address in a namespace
(BackendNet), where the agent accepts upstreams. Passwords are hashed with `openssl passwd -6`.
"""

import base64
import grp
import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from conftest import agent_common_jq, require, require_tools
from kokoa import policy_key
from netlab import (
    Backend,
    Edge,
    ForwardAuthVerifier,
    Nginx,
    access_policy,
    make_payload,
    rehash,
    sha512_crypt,
)

HOST = "app.example.com"
PASSWORD = "correct horse battery"
# crypt(3) hashes of bcrypt-pass-1 ($2b$) and bcrypt-pass-2 ($2y$), cost 5
BCRYPT = {"bcrypt-pass-1": "$2b$05$kokoakokoakokoakokoakeVE5h5Vl1TeamUIW1j1qIbX5UNTgqGLe",
          "bcrypt-pass-2": "$2y$05$edgeedgeedgeedgeedgeeOuCr1.yM15FqoIyBIK3GzO3GTHp.k5B6"}
SIGNIN = "https://auth.example.test/login?theme=dark"


@pytest.fixture(scope="module")
def alice():
    """The user alice with PASSWORD, as a policy lists her."""
    return ("alice", sha512_crypt(PASSWORD))


@pytest.fixture
def origin(backend_net):
    backend = Backend("origin", backend_net)
    yield backend
    backend.close()


@pytest.fixture
def verifier(backend_net):
    service = ForwardAuthVerifier(backend_net)
    yield service
    service.close()


def route(origin, policy=None, **options):
    """A schema-2 route object to `origin` with access policy `policy` (None: public)."""
    return {"upstream": origin.addr, "max_body_size": 0, "buffering": True, "hsts": True,
            "access": policy, **options}


def apply(edge, double, routes, rc=0):
    """Serve `routes` (hostname -> route object) as schema 2 and run `agent.sh once`."""
    double.payload = make_payload(routes, schema=2)
    return edge.once(rc=rc)


def fetch(edge, path="/", *curl_args, host=HOST, tls=True):
    """(code, headers, body) of a request to `host` on the edge, `path` sent as it is."""
    return edge.request(host, path, tls=tls, extra=list(curl_args))


def source(last_octet):
    """curl options that send from 127.0.0.<last_octet>."""
    return ["--interface", f"127.0.0.{last_octet}"]


def login(user="alice", password=PASSWORD):
    return ["-u", f"{user}:{password}"]


def websocket_handshake(edge, path, host=HOST, headers=(), source_address="127.0.0.1"):
    """The status code nginx answers a WebSocket handshake for `path` on `host` with (TLS)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Version: 13", *headers, "", ""]
    with socket.create_connection(("127.0.0.1", edge.https_port), timeout=10,
                                  source_address=(source_address, 0)) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall("\r\n".join(lines).encode())
        status = tls.recv(4096).split(b"\r\n", 1)[0]
    return int(status.split()[1])


def basic(user, password):
    """The header line a client sends for HTTP Basic credentials."""
    return "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def page(edge, path="/", *curl_args, host=HOST):
    """(code, body) of a request as fetch() makes it."""
    code, _, body = fetch(edge, path, *curl_args, host=host)
    return code, body


def worker_gids(nginx):
    """The effective group ids of nginx's current worker processes."""
    gids = set()
    for pid in nginx.workers():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Gid:"):
                gids.add(int(line.split()[2]))
    return gids


# ---------------------------------------------------------------------------------------------
# Passwords


def test_a_password_protects_the_host_and_never_reaches_the_origin(edge, double, origin, alice):
    apply(edge, double, {HOST: route(origin, access_policy(users=[alice]))})
    code, headers, _ = fetch(edge)
    assert code == 401 and headers["www-authenticate"] == f'Basic realm="{HOST}"'
    assert fetch(edge, "/", *login(password="wrong password"))[0] == 401
    assert fetch(edge, "/", *login(user="bob"))[0] == 401
    assert origin.seen == []
    assert page(edge, "/x?y=1", *login(), "-H", "Remote-User: mallory") == (200, "origin /x?y=1")
    seen = origin.seen[-1]
    assert "Authorization" not in seen and "Remote-User" not in seen
    assert seen["X-Forwarded-Proto"] == "https" and seen["X-Forwarded-For"] == "127.0.0.1"
    # Credentials travel only over TLS: port 80 redirects even without a real certificate.
    code, headers, _ = fetch(edge, "/p?q=1", tls=False)
    assert code == 301
    assert headers["location"] == f"https://{HOST}:{edge.https_port}/p?q=1"
    assert len(origin.seen) == 1


def test_bcrypt_hashes_work_and_pass_authorization_hands_the_header_on(edge, double, origin):
    users = [("bea", BCRYPT["bcrypt-pass-1"]), ("yan", BCRYPT["bcrypt-pass-2"])]
    apply(edge, double, {HOST: route(origin, access_policy(users=users,
                                                             pass_authorization=True))})
    assert fetch(edge, "/", *login("bea", "bcrypt-pass-2"))[0] == 401
    assert fetch(edge, "/", *login("bea", "bcrypt-pass-1"))[0] == 200
    assert fetch(edge, "/", *login("yan", "bcrypt-pass-2"))[0] == 200
    assert origin.seen[-1]["Authorization"] == basic("yan", "bcrypt-pass-2").split(": ", 1)[1]


# ---------------------------------------------------------------------------------------------
# Networks


def test_allow_lists_with_require_any_and_all(edge, double, origin, alice):
    lan = ["127.0.0.2/32"]
    apply(edge, double, {
        "any.example.com": route(origin, access_policy(users=[alice], allow=lan)),
        "all.example.com": route(origin, access_policy(users=[alice], allow=lan,
                                                       require="all")),
        "lan.example.com": route(origin, access_policy(allow=lan))})
    def code(host, *args):
        return fetch(edge, "/", *args, host=host)[0]
    assert code("any.example.com", *source(2)) == 200           # the network suffices
    assert code("any.example.com", *source(3)) == 401           # ... or the password
    assert code("any.example.com", *source(3), *login()) == 200
    assert code("all.example.com", *source(2)) == 401           # both are needed
    assert code("all.example.com", *source(3), *login()) == 403
    assert code("all.example.com", *source(2), *login()) == 200
    assert code("lan.example.com", *source(2)) == 200
    assert code("lan.example.com", *source(3)) == 403


def test_deny_beats_a_right_password_an_allowed_network_and_a_bypass_path(
        edge, double, origin, alice):
    policy = access_policy(users=[alice], allow=["127.0.0.0/24"], deny=["127.0.0.66/32"],
                           bypass_paths=["/api/"])
    apply(edge, double, {HOST: route(origin, policy),
                         "deny.example.com": route(origin, access_policy(
                             deny=["127.0.0.66/32"]))})
    assert fetch(edge, "/", *source(67))[0] == 200
    for path in ("/", "/api/x", "/api//x"):
        assert fetch(edge, path, *source(66), *login())[0] == 403, path
    assert fetch(edge, "/", *source(66), tls=False)[0] == 403
    assert websocket_handshake(edge, "/", headers=[basic("alice", PASSWORD)],
                               source_address="127.0.0.66") == 403
    # A deny-only policy leaves everyone else to the public site.
    assert fetch(edge, "/", *source(66), host="deny.example.com")[0] == 403
    assert page(edge, "/", host="deny.example.com") == (200, "origin /")
    assert all(seen["X-Forwarded-For"] != "127.0.0.66" for seen in origin.seen)


# ---------------------------------------------------------------------------------------------
# Bypass paths

SNEAKY_PATHS = ["/api/../private", "//private", "/%2e%2e/private", "/API/x", "/api%2Fx",
                "/api%2fx", "/api/%2e%2e/private", "/api/.%2e/private", "/api/..%2Fprivate",
                "/api/x%2F..%2F..%2Fprivate", "/api/..;/private", "/api;/x", "/%61pi/x",
                "/api/x/..", "/api/./x", "/api/%252e%252e/private", "/api//x", "/api/x%5C..",
                "/api\\..\\private", "/a/../api/x", "/api/%00"]


def test_bypass_paths_are_public_only_when_the_raw_uri_is_clean(edge, double, origin, alice):
    apply(edge, double, {
        HOST: route(origin, access_policy(users=[alice], bypass_paths=["/api/", "/status"])),
        "open.example.com": route(origin, access_policy(users=[alice], bypass_paths=["/"]))})
    for path in ("/api/items?q=/../x&r=%2F", "/status", "/statusboard", "/api/a%20b~c"):
        assert page(edge, path) == (200, f"origin {path}"), path
    seen = len(origin.seen)
    for path in ["/", "/private", "/BYPASS/", "/bypass%2Fx", *SNEAKY_PATHS]:
        code, headers, _ = fetch(edge, path)
        assert code in (400, 401), (path, code)
        assert code == 400 or headers["www-authenticate"].startswith("Basic"), path
    assert len(origin.seen) == seen                 # nothing reached the origin
    # Under the protection they still work for someone who logs in, as sent.
    assert page(edge, "/api//x", *login()) == (200, "origin /api//x")
    assert fetch(edge, "/api/..;/private", *login())[0] == 200
    assert origin.paths[-1] == "/api/..;/private"
    # Bypassing "/" leaves only unclean URIs protected.
    assert fetch(edge, "/anything", host="open.example.com")[0] == 200
    assert fetch(edge, "/x//y", host="open.example.com")[0] == 401
    # The edge's Basic credentials are kept from the origin on a bypass path too; an app's
    # own scheme is not.
    fetch(edge, "/api/me", *login())
    assert "Authorization" not in origin.seen[-1]
    fetch(edge, "/api/me", "-H", "Authorization: Bearer app-token")
    assert origin.seen[-1]["Authorization"] == "Bearer app-token"


def test_a_protected_websocket_needs_the_password(edge, double, origin, alice):
    apply(edge, double, {HOST: route(origin, access_policy(users=[alice],
                                                           bypass_paths=["/api/"]))})
    assert websocket_handshake(edge, "/ws") == 401
    assert websocket_handshake(edge, "/ws", headers=[basic("alice", "wrong")]) == 401
    assert origin.seen == []
    assert websocket_handshake(edge, "/ws", headers=[basic("alice", PASSWORD)]) == 101
    assert origin.seen[-1]["Upgrade"] == "websocket" and "Authorization" not in origin.seen[-1]
    assert websocket_handshake(edge, "/api/ws") == 101
    assert websocket_handshake(edge, "/api//ws") == 401
    assert websocket_handshake(edge, "/api/..%2Fws") == 401
    assert len(origin.seen) == 2


# ---------------------------------------------------------------------------------------------
# Forward auth


def test_forward_auth_allows_redirects_denies_and_fails_closed(edge, double, origin, verifier):
    def sso(signin_url):
        return access_policy(bypass_paths=["/api/"], forward_auth={
            "upstream": verifier.addr, "path": "/api/authz/auth-request",
            "signin_url": signin_url})
    apply(edge, double, {HOST: route(origin, sso(SIGNIN)),
                         "plain.example.com": route(origin, sso(None))})
    authority = f"{HOST}:{edge.https_port}"
    good = ["-b", "session=good"]
    spoof = ["-H", "Remote-User: mallory", "-H", "Remote-Email: m@x",
             "-H", "X-Auth-Request-User: mallory", "-H", "X-Forwarded-User: mallory",
             "-H", "X-authentik-username: mallory"]
    assert page(edge, "/app?a=1&b=2", *good, *spoof) == (200, "origin /app?a=1&b=2")
    asked = verifier.seen[-1]
    assert asked["path"] == "/api/authz/auth-request" and asked["body"] == b""
    headers = asked["headers"]
    assert headers["X-Original-URL"] == f"https://{authority}/app?a=1&b=2"
    assert headers["X-Original-Method"] == headers["X-Forwarded-Method"] == "GET"
    assert headers["X-Forwarded-Proto"] == "https" and headers["X-Forwarded-Host"] == authority
    assert headers["X-Forwarded-Uri"] == "/app?a=1&b=2"
    assert headers["X-Forwarded-For"] == "127.0.0.1" and headers["Cookie"] == "session=good"
    seen = origin.seen[-1]
    for name, value in ForwardAuthVerifier.USER.items():
        assert seen[name] == value
    # A request body never goes to the verifier; the method does.
    fetch(edge, "/form", *good, "--data-binary", "secret=1")
    assert verifier.seen[-1]["body"] == b""
    assert "Content-Length" not in verifier.seen[-1]["headers"]
    assert verifier.seen[-1]["headers"]["X-Original-Method"] == "POST"
    # 401: to the sign-in page with the original URL (escaped) in rd=; no sign-in URL: 401.
    code, headers, _ = fetch(edge, "/app?a=1&b=%2F+c")
    assert code == 302
    assert headers["location"] == f"{SIGNIN}&rd=https://{authority}/app?a=1%26b=%252F%2Bc"
    assert fetch(edge, "/app", host="plain.example.com")[0] == 401
    assert fetch(edge, "/app", "-b", "session=forbidden")[0] == 403
    # A bypass path asks no verifier and carries no identity a client made up.
    asked = len(verifier.seen)
    assert fetch(edge, "/api/x", *spoof)[0] == 200
    for name in ("Remote-User", "Remote-Email", "X-Auth-Request-User", "X-Forwarded-User",
                 "X-authentik-username"):
        assert name not in origin.seen[-1], name
    # Only a WebSocket is upgraded: an h2c upgrade on an open path must not reach the origin,
    # which could then serve any path over the raw pipe.
    assert fetch(edge, "/api/x", "--http1.1", "-H", "Upgrade: h2c",
                 "-H", "Connection: Upgrade, HTTP2-Settings",
                 "-H", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")[0] == 200
    assert "Upgrade" not in origin.seen[-1] and "HTTP2-Settings" in origin.seen[-1]
    assert origin.seen[-1].get("Connection", "").lower() != "upgrade"
    assert len(verifier.seen) == asked
    # The verifier is down: a 5xx, never the app.
    reached = len(origin.seen)
    verifier.close()
    code, _, _ = fetch(edge, "/app", *good)
    assert 500 <= code < 600
    assert len(origin.seen) == reached
    assert fetch(edge, "/api/x")[0] == 200


# ---------------------------------------------------------------------------------------------
# Files: the password file, hostile values, policies that fail


def test_the_password_file_is_0640_for_the_workers_group_and_written_atomically(
        edge, double, origin, alice):
    apply(edge, double, {HOST: route(origin, access_policy(users=[alice]))})
    path = edge.config_dir / "htpasswd" / HOST
    st = path.stat()
    assert oct(st.st_mode & 0o777) == "0o640" and st.st_uid == 0
    assert worker_gids(edge.nginx) == {st.st_gid}
    assert path.read_text() == f"{alice[0]}:{alice[1]}\n"
    assert fetch(edge, "/", *login())[0] == 200
    # A new user: the file is replaced (new inode), not rewritten in place; and put back as it
    # was when the apply fails.
    inode = st.st_ino
    bob = ("bob", sha512_crypt("bob's password"))
    double.payload = make_payload({HOST: route(origin, access_policy(users=[alice, bob]))},
                                  schema=2)
    edge.once(rc=1, env={"KOKOA_TEST_NGINX_FAIL_RELOAD": "1"})
    kept = path.stat()
    assert (kept.st_ino, kept.st_mode, kept.st_gid, kept.st_mtime_ns) == (
        st.st_ino, st.st_mode, st.st_gid, st.st_mtime_ns)
    edge.state_dir.joinpath("failed").unlink()          # retry the same payload at once
    apply(edge, double, {HOST: route(origin, access_policy(users=[alice, bob]))})
    assert path.stat().st_ino != inode and oct(path.stat().st_mode & 0o777) == "0o640"
    assert fetch(edge, "/", *login("bob", "bob's password"))[0] == 200
    # The policy goes: so does the file.
    apply(edge, double, {HOST: route(origin)})
    assert not path.exists() and edge.stray_files() == []
    assert fetch(edge, "/")[0] == 200


def test_the_password_file_follows_the_user_directive_of_nginx_conf(
        workdir, double, origin, alice):
    require_tools("nginx", "curl", "jq", "flock", "openssl")
    require(any(g.gr_name == "www-data" for g in grp.getgrall()), "no www-data group")
    edge = Edge(workdir, double.url)
    conf = edge.nginx.conf_path
    conf.write_text("user nobody www-data;\n" + conf.read_text())
    edge.nginx.start()
    try:
        apply(edge, double, {HOST: route(origin, access_policy(users=[alice]))})
        www_data = grp.getgrnam("www-data").gr_gid
        assert (edge.config_dir / "htpasswd" / HOST).stat().st_gid == www_data
        assert worker_gids(edge.nginx) == {www_data}
        assert fetch(edge, "/", *login())[0] == 200
    finally:
        edge.nginx.stop()


def hostile_policies(alice_hash):
    """name -> (policy with one hostile value, a string of it that must reach no file)."""
    base = access_policy(users=[("alice", alice_hash)])
    cases = {}

    def case(name, marker, **fields):
        cases[name] = (dict(base, **fields), marker)

    def user(username, hashed=alice_hash):
        return [{"username": username, "hash": hashed}]

    case("username-newline", "mallory", users=user("alice\nmallory"))
    case("username-colon", "al:ice", users=user("al:ice"))
    case("username-shell", "$(touch", users=user("$(touch /tmp/kokoa-pwned)"))
    case("hash-second-line", "mallory:", users=user("alice", alice_hash + "\nmallory:" +
                                                   alice_hash))
    case("hash-md5", "$1$saltsalt$", users=user("alice", "$1$saltsalt$Pa8RLCH0g7Y5R8C3GhI9B."))
    case("hash-plain", "hunter2hunter2", users=user("alice", "hunter2hunter2"))
    case("allow-directive", "include /etc", allow=["10.0.0.0/8; include /etc/passwd"])
    case("allow-host-bits", "10.1.2.3/8", allow=["10.1.2.3/8"])
    case("allow-prefix-too-long", "10.0.0.0/33", allow=["10.0.0.0/33"])
    case("deny-geo-entry", "default 1", deny=["10.0.0.0/8 1;\n    default 1"])
    case("deny-not-ip", "example.net", deny=["example.net/32"])
    case("require-other", "some", require="some")
    case("bypass-dot-segment", "/api/../", bypass_paths=["/api/../"])
    case("bypass-brace", "/api/}", bypass_paths=["/api/}"])
    case("bypass-variable", "$hostile", bypass_paths=["/$hostile"])
    case("bypass-space", "/a b", bypass_paths=["/a b"])
    case("fa-loopback", "127.0.0.1:9091", forward_auth={
        "upstream": "127.0.0.1:9091", "path": "/auth", "signin_url": None})
    case("fa-hostname", "auth.example.net", forward_auth={
        "upstream": "auth.example.net:9091", "path": "/auth", "signin_url": None})
    case("fa-path", "return 200", forward_auth={
        "upstream": "10.8.0.2:9091", "path": "/auth; return 200", "signin_url": None})
    case("fa-signin-quote", "return 200", forward_auth={
        "upstream": "10.8.0.2:9091", "path": "/auth",
        "signin_url": 'https://auth.example.test/"; return 200 "x'})
    case("fa-signin-variable", "${host}", forward_auth={
        "upstream": "10.8.0.2:9091", "path": "/auth",
        "signin_url": "https://auth.example.test/${host}"})
    case("fa-signin-scheme", "javascript:", forward_auth={
        "upstream": "10.8.0.2:9091", "path": "/auth", "signin_url": "javascript:alert(1)"})
    case("pass-authorization-string", None, pass_authorization="yes")
    case("protects-nothing", None, users=[])
    case("duplicate-user", None, users=user("alice") + user("alice"))
    case("too-many-networks", None, allow=[f"10.0.{i}.0/24" for i in range(257)])
    return cases


HOSTILE_NAMES = sorted(hostile_policies("$6$x$" + "y" * 86))


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_policy_value_takes_only_its_routes_out_and_reaches_no_file(
        name, edge, double, origin, alice):
    policy, marker = hostile_policies(alice[1])[name]
    good = access_policy(users=[alice])
    proc = apply(edge, double, {"bad.example.com": route(origin, policy),
                                "also-bad.example.com": route(origin, policy),
                                "good.example.com": route(origin, good),
                                "open.example.com": route(origin)})
    assert edge.server_files() == ["good.example.com.conf", "open.example.com.conf"]
    assert fetch(edge, "/", host="good.example.com")[0] == 401
    assert fetch(edge, "/", host="open.example.com")[0] == 200
    assert fetch(edge, "/", host="bad.example.com")[0] is None      # no TLS for it at all
    assert fetch(edge, "/", host="bad.example.com", tls=False)[0] == 404
    if marker is not None:
        for path in edge.config_dir.rglob("*"):
            if path.is_file():
                assert marker.encode() not in path.read_bytes(), path
    report = double.reports[-1]
    assert report["ok"] is False
    assert report["applied_hash"] == double.payload["config_hash"]
    assert f"access policy {policy_key(policy)}" in report["error"]
    assert "not serving also-bad.example.com and 1 more" in report["error"]
    assert "access policy" in proc.stderr


def test_a_policy_the_edge_cannot_render_takes_its_routes_out_and_they_come_back(
        edge, double, origin, alice, workdir):
    calls = workdir / "certbot-calls"
    fake = workdir / "certbot"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {calls}\nexit 1\n")
    fake.chmod(0o755)
    edge.env.update(EMAIL="ops@example.com", CERTBOT_BIN=str(fake), NGINX_GROUP="no-such-grp")
    routes = {HOST: route(origin, access_policy(users=[alice])),
              "lan.example.com": route(origin, access_policy(allow=["127.0.0.2/32"])),
              "open.example.com": route(origin)}
    apply(edge, double, routes)
    assert edge.server_files() == ["lan.example.com.conf", "open.example.com.conf"]
    assert not (edge.config_dir / "htpasswd" / HOST).exists()
    error = double.reports[-1]["error"]
    assert "no-such-grp" in error and f"not serving {HOST}" in error
    assert HOST not in calls.read_text()                # no certificate for what is not served
    status = edge.agent("status", check_rc=0).stdout
    assert "not served:" in status and HOST in status
    del edge.env["NGINX_GROUP"]
    double.payload = rehash(dict(double.payload, acme={"staging": True}))
    edge.once()
    assert HOST + ".conf" in edge.server_files()
    assert fetch(edge, "/", *login())[0] == 200
    report = double.reports[-1]
    assert report["ok"] is True and "error" not in report


def test_a_config_nginx_refuses_leaves_no_protected_route_on_its_old_public_files(
        edge, double, origin, verifier, workdir):
    """An nginx built without auth_request (as a plain source build is) refuses a forward-auth
    policy. The rollback would bring back the route's old, public server file: the agent then
    applies the config again without the protected routes, and says so."""
    apply(edge, double, {HOST: route(origin), "open.example.com": route(origin)})
    assert page(edge, "/")[0] == 200                  # public, before its policy
    wrapper = workdir / "nginx-without-auth-request"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"if [ \"$1\" = -t ] && grep -rqs auth_request {edge.config_dir}; then\n"
        "    echo 'nginx: [emerg] unknown directive \"auth_request\"' >&2; exit 1\n"
        f"fi\nexec {edge.nginx.wrapper} \"$@\"\n")
    wrapper.chmod(0o755)
    edge.env["NGINX_BIN"] = str(wrapper)
    sso = access_policy(forward_auth={"upstream": verifier.addr, "path": "/auth",
                                      "signin_url": None})
    apply(edge, double, {HOST: route(origin, sso), "open.example.com": route(origin)}, rc=1)
    assert edge.server_files() == ["open.example.com.conf"]
    assert page(edge, "/", host="open.example.com")[0] == 200
    assert fetch(edge, "/", tls=False)[0] == 404      # the name is unknown to the edge now
    error = double.reports[-1]["error"]
    assert "unknown directive 'auth_request'" in error
    assert "applied without its protected routes" in error and f"not serving {HOST}" in error


def test_a_schema_2_payload_from_before_access_policies_is_still_applied(edge, double, origin):
    payload = make_payload({HOST: route(origin)}, schema=2)
    del payload["access"]
    del payload["routes"][HOST]["access"]
    double.payload = rehash(payload)
    edge.once()
    assert page(edge, "/") == (200, "origin /")


# ---------------------------------------------------------------------------------------------
# Brute force


def curl_many(edge, count, *args):
    """HTTP codes of `count` parallel requests to HOST (curl --parallel), and the seconds taken."""
    url = f"https://{HOST}:{edge.https_port}/"
    started = time.monotonic()
    out = subprocess.run(
        ["curl", "-sk", "--parallel", "--parallel-immediate", "--parallel-max", "100",
         "--max-time", "30", "--resolve", f"{HOST}:{edge.https_port}:127.0.0.1",
         "-w", "%{http_code}\n", *args, *["-o", "/dev/null", url] * count],
        capture_output=True, text=True, timeout=60).stdout.split()
    return out, time.monotonic() - started


def test_password_guessing_gets_429_beyond_the_burst(edge, double, origin, alice):
    apply(edge, double, {HOST: route(origin, access_policy(users=[alice]))})
    codes, _ = curl_many(edge, 60)                       # no credentials: not limited
    assert codes == ["401"] * 60
    codes, seconds = curl_many(edge, 150, *login(password="guess"))
    tried = codes.count("401")                   # the guesses nginx checked
    assert set(codes) == {"401", "429"}
    assert 31 <= tried <= 61 + 5 * seconds + 1, (tried, seconds)   # a burst, then 5 a second
    # The limit is per client address: someone else still logs in.
    assert fetch(edge, "/", *source(9), *login())[0] == 200


IPV6_NETS = {"2001:db8:1::1": "2001:db8:1:0", "2001:db8:1:0:ffff::9": "2001:db8:1:0",
             "2001:db8:1:0:1:2:3:4": "2001:db8:1:0", "2001:db8:2::1": "2001:db8:2:0",
             "2001:0:0:3::7": "2001:0:0:3", "2001::3:4:5:6:7": "2001:0:0:3",
             "::5:6:7:8:9": "0:0:0:5", "::4:5:6:7:8:9": "0:0:4:5", "::1": "0:0:0:0",
             "1:2:3::8": "1:2:3:0", "1:2::7:8": "1:2:0:0", "fd00:1:2:3:4:5:6:7": "fd00:1:2:3"}


def test_the_brute_force_limit_counts_an_ipv6_client_by_its_64(edge, double, origin, alice,
                                                                workdir):
    """One host holds a whole /64: the limit's key must be the same for all of it. nginx (in a
    namespace whose loopback holds the addresses) evaluates the agent's own map."""
    apply(edge, double, {HOST: route(origin, access_policy(users=[alice]))})
    text = (edge.config_dir / "policies.conf").read_text()
    start = text.index("map $remote_addr $kokoa_client_net {")
    probe_dir = workdir / "probe"
    probe_dir.mkdir()
    (probe_dir / "probe.conf").write_text(text[start:text.index("\n}\n", start) + 3] + (
        "server {\n    listen [::1]:8080;\n    listen 127.0.0.1:8080;\n"
        '    return 200 "$kokoa_client_net";\n}\n'))
    netns = f"kokoa-v6-{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
    probe = Nginx(workdir / "probe-nginx", probe_dir, netns=netns)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True, timeout=30)
        for address in IPV6_NETS:
            if address != "::1":
                subprocess.run(["ip", "-n", netns, "addr", "add", f"{address}/128", "dev", "lo",
                                "nodad"], check=True, timeout=30)
        probe.start()
        keys = {}
        for address in [*IPV6_NETS, "127.0.0.1"]:
            url = "http://127.0.0.1:8080/" if "." in address else "http://[::1]:8080/"
            keys[address] = subprocess.run(
                ["ip", "netns", "exec", netns, "curl", "-sS", "-g", "--interface", address, url],
                capture_output=True, text=True, timeout=30, check=True).stdout
        assert keys == {**IPV6_NETS, "127.0.0.1": "127.0.0.1"}
    finally:
        probe.stop()
        subprocess.run(["ip", "netns", "del", netns], timeout=30)


# ---------------------------------------------------------------------------------------------
# The patterns, value by value (the agent's own jq, as a payload's values reach it)

VALID_POLICY = access_policy(users=[("alice", "$6$" + "s" * 16 + "$" + "h" * 86)])
PATTERN_CASES = [
    ({}, None),
    ({"users": [{"username": "a.b_c@d-e", "hash": "$6$rounds=5000$salt$" + "h" * 86}]}, None),
    ({"users": [{"username": "u", "hash": BCRYPT["bcrypt-pass-1"]}]}, None),
    ({"users": [{"username": "u" * 65, "hash": BCRYPT["bcrypt-pass-1"]}]}, "username"),
    ({"users": [{"username": "", "hash": BCRYPT["bcrypt-pass-1"]}]}, "username"),
    ({"users": [{"username": "ü", "hash": BCRYPT["bcrypt-pass-1"]}]}, "username"),
    ({"users": [{"username": 7, "hash": BCRYPT["bcrypt-pass-1"]}]}, "username"),
    ({"users": ["alice"]}, "username"),
    ({"users": [{"username": "u", "hash": "$6$" + "s" * 17 + "$" + "h" * 86}]}, "hash"),
    ({"users": [{"username": "u", "hash": "$6$s$" + "h" * 85}]}, "hash"),
    ({"users": [{"username": "u", "hash": "$2a$05$" + "h" * 53}]}, "hash"),
    ({"users": [{"username": "u", "hash": "$6$rounds=100001$s$" + "h" * 86}]}, "hash"),
    ({"users": [{"username": "u", "hash": "$6$rounds=100000$s$" + "h" * 86}]}, None),
    ({"users": [{"username": "u", "hash": "$2b$13$" + "h" * 53}]}, "hash"),
    ({"users": [{"username": "u", "hash": "$2y$12$" + "h" * 53}]}, None),
    ({"users": [{"username": "u", "hash": None}]}, "hash"),
    ({"users": "alice"}, "users"),
    ({"allow": ["198.18.0.0/24", "2001:db8::/32", "::/0", "0.0.0.0/0", "10.1.2.3/32"]}, None),
    ({"allow": ["2001:db8::1/32"]}, "allow"),
    ({"allow": ["2001:db8:0:0:0:0:0:1/128"]}, None),
    ({"allow": ["10.0.0.1"]}, "allow"),
    ({"allow": ["256.0.0.0/8"]}, "allow"),
    ({"allow": ["10.0.0.0/08"]}, "allow"),
    ({"allow": ["2001:DB8::/32"]}, "allow"),
    ({"allow": "10.0.0.0/8"}, "allow"),
    ({"deny": ["::ffff:10.0.0.1/128"]}, "deny"),
    ({"deny": [None]}, "deny"),
    ({"require": "all"}, None),
    ({"require": "ANY"}, "require"),
    ({"bypass_paths": ["/", "/api/", "/a.b~c-d_e/f"]}, None),
    ({"bypass_paths": ["/api//"]}, "bypass"),
    ({"bypass_paths": ["/."]}, "bypass"),
    ({"bypass_paths": ["/a/./b"]}, "bypass"),
    ({"bypass_paths": ["/.well-known/"]}, None),
    ({"bypass_paths": ["api"]}, "bypass"),
    ({"bypass_paths": ["/a%2F"]}, "bypass"),
    ({"bypass_paths": ["/" + "a" * 201]}, "bypass"),
    ({"bypass_paths": ["/a", "/a"]}, "twice"),
    ({"pass_authorization": None}, "pass_authorization"),
    ({"forward_auth": {"upstream": "10.8.0.2:9091", "path": "/oauth2/auth",
                       "signin_url": "https://auth.example.test:8443/oauth2/start?x=%2F&y=+"}},
     None),
    ({"forward_auth": {"upstream": "[fd00::2]:9091", "path": "/", "signin_url": None}}, None),
    ({"forward_auth": {"upstream": "[::1]:9091", "path": "/", "signin_url": None}}, "loopback"),
    ({"forward_auth": {"upstream": "169.254.169.254:80", "path": "/", "signin_url": None}},
     "link-local"),
    ({"forward_auth": {"upstream": "10.8.0.2", "path": "/", "signin_url": None}}, "ip:port"),
    ({"forward_auth": {"upstream": "10.8.0.2:9091", "path": "auth", "signin_url": None}},
     "path"),
    ({"forward_auth": {"upstream": "10.8.0.2:9091", "path": "/",
                       "signin_url": "https://auth.example.test:99999/"}}, "signin_url"),
    ({"forward_auth": {"upstream": "10.8.0.2:9091", "path": "/",
                       "signin_url": "https://auth.example.test/#x"}}, "signin_url"),
    ({"forward_auth": {"upstream": "10.8.0.2:9091", "path": "/",
                       "signin_url": "https://" + "a" * 63 + "." + "b" * 450 + ".test/"}},
     "signin_url"),
    ({"forward_auth": {"upstream": "10.8.0.2:9091", "path": "/",
                       "signin_url": "ftp://auth.example.test/"}}, "signin_url"),
    ({"forward_auth": "yes"}, "forward_auth"),
    ({"users": [], "deny": ["10.0.0.0/8"]}, None),
    ({"users": []}, "protects nothing"),
]


def test_policy_values_are_checked_by_strict_patterns():
    require_tools("jq")
    policies = [dict(VALID_POLICY, **fields) for fields, _ in PATTERN_CASES]
    program = agent_common_jq() + ' map(policy_problem(address_guard("")))'
    out = subprocess.run(["jq", "-c", program], input=json.dumps(policies), text=True,
                         capture_output=True, timeout=60, check=True).stdout
    for (fields, expected), problem in zip(PATTERN_CASES, json.loads(out), strict=True):
        if expected is None:
            assert problem is None, (fields, problem)
        else:
            assert problem is not None and expected in problem, (fields, problem)
