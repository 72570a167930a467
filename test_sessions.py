"""Admin sessions (issue 16, DESIGN v2 "Admin sessions"), tried as an attacker would.

A real control plane under waitress in this process; every request is a real HTTP request.
Time is moved by editing the stored session rows, never by patching the clock.
"""

import base64
import dataclasses
import ipaddress
import os
import sqlite3
from pathlib import Path

import pytest

import kokoa
from conftest import (
    InProcessServer,
    basic_auth,
    edited_backup,
    make_config,
    remember_secret,
    run_cli,
    send_json,
    send_request,
)


@pytest.fixture
def server(tmp_path):
    server = InProcessServer(make_config(tmp_path / "k.db"))
    yield server
    server.close()


def login(server, headers=None, password=None, username=None, source="127.0.0.1"):
    """POST /api/v1/session; (status, Set-Cookie header or None, body)."""
    body = {"username": username or server.admin_user,
            "password": server.admin_password if password is None else password}
    status, headers, data = send_json(server, "POST", "/api/v1/session", headers, body, source)
    if headers.get("Set-Cookie"):       # the session audit: no log line may carry a cookie
        remember_secret(cookie_of(headers["Set-Cookie"])[0].split("=", 1)[1])
    return status, headers.get("Set-Cookie"), data


def cookie_of(set_cookie):
    """'name=value' and the set of attributes of a Set-Cookie header."""
    first, *attributes = [part.strip() for part in set_cookie.split(";")]
    return first, {attribute.split("=")[0].lower(): attribute for attribute in attributes}


def logged_in(server, **kwargs):
    status, set_cookie, _ = login(server, **kwargs)
    assert status == 204
    return cookie_of(set_cookie)[0]


def own_origin(server):
    return {"Origin": server.url}


def sessions(server):
    return server.rows("SELECT id, token_hash FROM admin_sessions")


def test_login_over_plain_http_on_loopback_sets_a_strict_cookie_and_stores_only_a_hash(server):
    status, set_cookie, _ = login(server)
    assert status == 204
    pair, attributes = cookie_of(set_cookie)
    name, token = pair.split("=", 1)
    assert name == kokoa.SESSION_COOKIE and kokoa.SESSION_TOKEN_RE.fullmatch(token)
    assert set(attributes) == {"path", "max-age", "httponly", "samesite"}    # no Secure on http
    assert attributes["path"] == "Path=/" and attributes["samesite"] == "SameSite=Strict"
    status, _, me = send_json(server, "GET", "/api/v1/session", {"Cookie": pair})
    assert status == 200 and me["username"] == server.admin_user and me["method"] == "session"
    assert kokoa.parse_iso_time(me["expires_at"]) > kokoa.parse_iso_time(me["created_at"])
    assert send_json(server, "GET", "/api/v1/origins", {"Cookie": pair})[0] == 200
    # at rest: the SHA-256 of the cookie, never the cookie
    [(_, token_hash)] = sessions(server)
    assert token_hash == kokoa.hash_token(token)
    db_bytes = b"".join(p.read_bytes() for p in Path(server.config.db_path).parent.glob("k.db*"))
    assert token.encode() not in db_bytes
    # Basic keeps working for scripts, and says so
    basic = {"Authorization": basic_auth(server.admin_user, server.admin_password)}
    assert send_json(server, "GET", "/api/v1/session", basic)[2]["method"] == "basic"


def test_behind_a_trusted_https_proxy_the_cookie_is_secure_and_host_prefixed(tmp_path):
    server = InProcessServer(make_config(tmp_path / "k.db",
                                         trusted_proxy=ipaddress.ip_address("127.0.0.1")))
    proxy = {"X-Forwarded-For": "203.0.113.5", "X-Forwarded-Proto": "https"}
    try:
        status, set_cookie, _ = login(server, proxy)
        assert status == 204
        pair, attributes = cookie_of(set_cookie)
        assert pair.startswith(kokoa.SESSION_COOKIE_SECURE + "=")
        assert {"secure", "httponly", "samesite", "path"} <= set(attributes)
        assert "domain" not in attributes
        assert send_json(server, "GET", "/api/v1/session", {**proxy, "Cookie": pair})[0] == 200
        # the same token under the plain name (as a sibling http page could set it) opens nothing
        token = pair.split("=", 1)[1]
        assert send_json(server, "GET", "/api/v1/session",
                    {**proxy, "Cookie": f"{kokoa.SESSION_COOKIE}={token}"})[0] == 401
        # a write through the proxy needs the https origin of the public name
        origin = {"Origin": f"https://127.0.0.1:{server.url.rsplit(':', 1)[1]}"}
        assert send_json(server, "POST", "/api/v1/enrollment-keys",
                    {**proxy, "Cookie": pair, "Origin": server.url}, {})[0] == 403
        assert send_json(server, "POST", "/api/v1/enrollment-keys",
                    {**proxy, "Cookie": pair, **origin}, {})[0] == 201
    finally:
        server.close()


@pytest.mark.parametrize("cookie", [
    f"{kokoa.SESSION_COOKIE}=" + "A" * 43,                         # well-formed, unknown
    f"{kokoa.SESSION_COOKIE}=" + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("="),
    f"{kokoa.SESSION_COOKIE}=short",
    f"{kokoa.SESSION_COOKIE}=" + "A" * 42 + ";",
    f"{kokoa.SESSION_COOKIE}=" + "A" * 43 + "%00",
    f"{kokoa.SESSION_COOKIE}='; DROP TABLE admin_sessions; --",
])
def test_a_forged_cookie_opens_nothing(server, cookie):
    logged_in(server)
    for path in ("/api/v1/session", "/api/v1/origins", "/api/v1/settings"):
        status, headers, error = send_json(server, "GET", path, {"Cookie": cookie})
        assert status == 401 and error["error"]["code"] == "unauthorized", path
    assert send_json(server, "POST", "/api/v1/enrollment-keys",
                {"Cookie": cookie, **own_origin(server)}, {})[0] == 401
    assert len(sessions(server)) == 1


def test_the_ui_s_fetches_get_no_basic_challenge_and_scripts_still_do(server):
    status, headers, _ = send_json(server, "GET", "/api/v1/origins")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    status, headers, _ = send_json(server, "GET", "/api/v1/origins", {"X-Requested-With": "kokoa"})
    assert status == 401 and "WWW-Authenticate" not in headers
    stale = f"{kokoa.SESSION_COOKIE}=" + "B" * 43
    status, headers, error = send_json(server, "GET", "/api/v1/origins", {"Cookie": stale})
    assert status == 401 and "WWW-Authenticate" not in headers
    assert "log in again" in error["error"]["message"]
    status, headers, _ = login(server, password="wrong password")
    assert status == 401
    # the UI's shell loads without credentials: it holds no data
    status, headers, raw = send_request(server.url, "GET", "/")
    assert status == 200 and b"login" in raw and "WWW-Authenticate" not in headers


def age_sessions(server, **columns):
    db = sqlite3.connect(server.config.db_path)
    try:
        for column, seconds in columns.items():
            db.execute(f"UPDATE admin_sessions SET {column} = ?",
                       (kokoa.iso_time(kokoa.time.time() - seconds),))
        db.commit()
    finally:
        db.close()


@pytest.mark.parametrize("columns", [
    {"last_used_at": kokoa.SESSION_IDLE_SECONDS + 60},                       # idle 12 h
    {"created_at": kokoa.SESSION_MAX_SECONDS + 60, "last_used_at": 0},      # 7 days, busy
])
def test_an_expired_session_opens_nothing_and_is_deleted(server, columns):
    cookie = {"Cookie": logged_in(server)}
    assert send_json(server, "GET", "/api/v1/origins", cookie)[0] == 200
    age_sessions(server, **columns)
    assert send_json(server, "GET", "/api/v1/origins", cookie)[0] == 401
    assert sessions(server) == []


def test_a_session_in_use_stays_open_past_twelve_hours_since_login(server):
    cookie = {"Cookie": logged_in(server)}
    age_sessions(server, created_at=kokoa.SESSION_IDLE_SECONDS + 3600,
                 last_used_at=kokoa.SESSION_TOUCH_SECONDS + 5)
    assert send_json(server, "GET", "/api/v1/origins", cookie)[0] == 200
    [(last_used,)] = server.rows("SELECT last_used_at FROM admin_sessions")
    assert kokoa.time.time() - kokoa.parse_iso_time(last_used) < 30    # the use was noted


def test_a_cookie_from_before_the_password_changed_opens_nothing(tmp_path):
    config = make_config(tmp_path / "k.db")
    server = InProcessServer(config)
    try:
        cookie = {"Cookie": logged_in(server)}
        assert send_json(server, "GET", "/api/v1/origins", cookie)[0] == 200
    finally:
        server.close()
    for changed in ({"admin_password": config.admin_password + "-new"},
                    {"admin_user": "root"}):
        again = InProcessServer(dataclasses.replace(config, **changed))
        try:
            assert send_json(again, "GET", "/api/v1/origins", cookie)[0] == 401, changed
        finally:
            again.close()
    restarted = InProcessServer(config)       # the same password again: the row is gone
    try:
        assert send_json(restarted, "GET", "/api/v1/origins", cookie)[0] == 401
        assert sessions(restarted) == []
    finally:
        restarted.close()


def test_a_session_survives_a_restart_with_the_same_credentials(tmp_path):
    config = make_config(tmp_path / "k.db")
    server = InProcessServer(config)
    cookie = {"Cookie": logged_in(server)}
    server.close()
    server = InProcessServer(config)
    try:
        assert send_json(server, "GET", "/api/v1/origins", cookie)[0] == 200
    finally:
        server.close()


@pytest.mark.parametrize("headers, want", [
    ({}, 403),                                               # no Origin, no Sec-Fetch-Site
    ({"Origin": "http://localhost:9999"}, 403),              # another local port: same site
    ({"Origin": "http://127.0.0.1"}, 403),
    ({"Origin": "https://attacker.example"}, 403),
    ({"Origin": "null"}, 403),
    ({"Sec-Fetch-Site": "same-site"}, 403),
    ({"Sec-Fetch-Site": "cross-site", "Origin": "SELF"}, 403),
    ({"Origin": "SELF"}, 201),
    ({"Sec-Fetch-Site": "same-origin"}, 201),
])
def test_a_cookie_authenticated_write_must_come_from_the_same_origin(server, headers, want):
    headers = {name: server.url if value == "SELF" else value for name, value in headers.items()}
    cookie = {"Cookie": logged_in(server)}
    status, _, body = send_json(server, "POST", "/api/v1/enrollment-keys",
                                {**cookie, **headers}, {})
    assert status == want, body
    assert len(server.rows("SELECT * FROM enrollment_keys")) == (1 if want == 201 else 0)
    for method, path in (("DELETE", "/api/v1/session"), ("PATCH", "/api/v1/settings")):
        if want == 403:
            assert send_json(server, method, path, {**cookie, **headers},
                        {"acme_staging": True} if method == "PATCH" else None)[0] == 403
    assert send_json(server, "GET", "/api/v1/origins", cookie)[0] == 200     # reads need no Origin


def test_login_from_another_page_is_refused(server):
    for origin in ("http://localhost:9999", "https://attacker.example"):
        assert login(server, {"Origin": origin})[0] == 403
    assert login(server, own_origin(server))[0] == 204


def test_login_guesses_are_rate_limited_with_basic_s_and_the_password_does_not_help(server):
    statuses = [login(server, password=f"guess {i}", source="127.0.0.7")[0]
                for i in range(kokoa.AUTH_FAILURE_LIMIT)]
    assert statuses == [401] * kokoa.AUTH_FAILURE_LIMIT
    status, headers, _ = send_json(server, "POST", "/api/v1/session", None, {
        "username": server.admin_user, "password": server.admin_password}, "127.0.0.7")
    assert status == 429 and int(headers["Retry-After"]) >= 1
    # the same counter as Basic's: a script's guesses and the form's add up
    for i in range(kokoa.AUTH_FAILURE_LIMIT - 1):
        send_json(server, "GET", "/api/v1/origins",
             {"Authorization": basic_auth("admin", f"guess {i}")}, source="127.0.0.8")
    assert login(server, password="one more", source="127.0.0.8")[0] == 401
    assert login(server, source="127.0.0.8")[0] == 429
    assert login(server, source="127.0.0.9")[0] == 204          # other clients are not held back
    assert len(sessions(server)) == 1


def test_the_slowdown_for_everyone_covers_the_login_page(server):
    server.app.admin_slowdown = kokoa.FailureSlowdown(threshold=3, interval=3600)
    for i in range(3):
        assert login(server, password="nope", source=f"127.0.1.{i + 1}")[0] == 401
    assert login(server, source="127.0.1.50")[0] == 204          # the first try passes ...
    assert login(server, source="127.0.1.51")[0] == 429          # ... the next waits


def test_a_planted_cookie_is_never_adopted_and_login_ends_the_old_session(server):
    planted = f"{kokoa.SESSION_COOKIE}=" + "F" * 43
    fresh = logged_in(server, headers={"Cookie": planted})
    assert fresh != planted
    assert send_json(server, "GET", "/api/v1/origins", {"Cookie": planted})[0] == 401
    assert send_json(server, "GET", "/api/v1/origins", {"Cookie": fresh})[0] == 200
    again = logged_in(server, headers={"Cookie": fresh})      # a second login rotates it
    assert again != fresh
    assert send_json(server, "GET", "/api/v1/origins", {"Cookie": fresh})[0] == 401
    assert send_json(server, "GET", "/api/v1/origins", {"Cookie": again})[0] == 200
    assert len(sessions(server)) == 1


def test_logout_ends_the_session_on_the_server(server):
    pair = logged_in(server)
    other = logged_in(server)
    status, headers, _ = send_json(server, "DELETE", "/api/v1/session",
                              {"Cookie": pair, **own_origin(server)})
    assert status == 204
    cleared, attributes = cookie_of(headers["Set-Cookie"])
    assert cleared == f"{kokoa.SESSION_COOKIE}=" and attributes["max-age"] == "Max-Age=0"
    # a copy of the cookie kept by an attacker (or a browser that ignored the clearing) is dead
    assert send_json(server, "GET", "/api/v1/session", {"Cookie": pair})[0] == 401
    assert send_json(server, "GET", "/api/v1/session", {"Cookie": other})[0] == 200
    assert len(sessions(server)) == 1


def test_sessions_are_bounded_and_the_least_recently_used_goes_first(server):
    cookies = [logged_in(server, source=f"127.0.2.{i % 200 + 1}")
               for i in range(kokoa.SESSION_LIMIT + 1)]
    assert len(sessions(server)) == kokoa.SESSION_LIMIT
    assert send_json(server, "GET", "/api/v1/origins", {"Cookie": cookies[0]})[0] == 401
    assert send_json(server, "GET", "/api/v1/origins", {"Cookie": cookies[-1]})[0] == 200


@pytest.mark.parametrize("body, field", [
    ({"username": "admin"}, "password"),
    ({"password": "x"}, "username"),
    ({"username": 7, "password": "x"}, "username"),
    ({"username": "admin", "password": ["x"]}, "password"),
    ({"username": "admin", "password": "x" * 2000}, "password"),
    ({"username": "admin", "password": "x", "remember": True}, "remember"),
])
def test_a_malformed_login_is_a_400_naming_the_field(server, body, field):
    status, _, error = send_json(server, "POST", "/api/v1/session", None, body)
    assert status == 400 and error["error"]["field"] == field
    assert sessions(server) == []


def test_without_a_password_loopback_needs_no_login_and_there_is_none(tmp_path):
    server = InProcessServer(make_config(tmp_path / "k.db", admin_password=""))
    try:
        status, _, me = send_json(server, "GET", "/api/v1/session")
        assert status == 200 and me["method"] == "loopback"
        assert login(server, password="")[0] == 403
        assert send_json(server, "GET", "/api/v1/session",
                         {"X-Forwarded-For": "203.0.113.9"})[0] == 401
    finally:
        server.close()


def test_a_backup_with_sessions_restores_and_a_crafted_session_row_is_refused(tmp_path):
    db_path = str(tmp_path / "live.db")
    server = InProcessServer(make_config(db_path))
    logged_in(server)
    server.close()
    good = edited_backup(db_path, tmp_path / "good.db")
    result = run_cli("restore", str(good), "--db", db_path, "--force", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    crafted = edited_backup(db_path, tmp_path / "crafted.db",
                            "UPDATE admin_sessions SET password_mac = upper(password_mac)")
    result = run_cli("restore", str(crafted), "--db", db_path, "--force", cwd=tmp_path)
    assert result.returncode == 2 and "password_mac" in result.stderr


def test_behind_a_proxy_on_another_port_the_public_url_is_the_page_s_origin(tmp_path):
    url, host = kokoa.parse_public_url("https://kokoa.example.com:8443")
    server = InProcessServer(make_config(tmp_path / "k.db", public_url=url, public_host=host,
                                         trusted_proxy=ipaddress.ip_address("127.0.0.1")))
    # nginx's `proxy_set_header Host $host` drops the port the browser used
    proxy = {"Host": "kokoa.example.com", "X-Forwarded-For": "203.0.113.5"}
    try:
        cookie = {"Cookie": logged_in(server, headers={**proxy, "Origin": url})}
        for origin, want in ((url, 201), ("https://kokoa.example.com", 201),
                             ("https://kokoa.example.com:9443", 403),
                             ("http://kokoa.example.com:8443", 403)):
            status = send_json(server, "POST", "/api/v1/enrollment-keys",
                          {**proxy, **cookie, "Origin": origin}, {})[0]
            assert status == want, origin
    finally:
        server.close()


@pytest.mark.parametrize("cookie", [
    ";" * 5000, "kokoa_session", "kokoa_session=", "=" * 100, "kokoa_session=\u00e9" * 10,
    "; ".join(f"kokoa_session={'C' * 43}" for _ in range(200)), "a=b; kokoa_session =x",
])
def test_hostile_cookie_headers_are_a_plain_401(server, cookie):
    status, _, error = send_json(server, "GET", "/api/v1/origins",
                            {"Cookie": cookie.encode("utf-8").decode("latin-1")})
    assert status == 401 and error["error"]["code"] == "unauthorized"
