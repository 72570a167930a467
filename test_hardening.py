"""Hardening of the control plane: hostile input, an nginx invariant, faults, access control.

Property-based tests use hypothesis (derandomized, bounded) against kokoa.make_app under a real
waitress; fault tests run a real `python kokoa.py serve` (kill -9, a read-only or full tmpfs).
"""

import base64
import contextlib
import http.client
import io
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from wsgiref.validate import validator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

import kokoa
from conftest import (
    InProcessServer,
    KokoaServer,
    agent_is_host,
    basic_auth,
    free_port,
    make_config,
    nginx_test,
    require_root,
    require_tools,
    wait_until,
    wg_keypair,
    write_nginx_prefix,
)
from conftest import send_request as send

TABLES = ("origins", "routes", "edge_nodes", "settings", "enrollment_keys")
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
_SOURCES = itertools.count()


def next_source():
    """A fresh loopback source address, so that fuzzing never trips the per-address limiter."""
    n = next(_SOURCES)
    return f"127.77.{n // 250 % 250}.{n % 250 + 1}"


class HardenedServer(InProcessServer):
    """InProcessServer whose snapshot also covers enrollment keys."""

    def snapshot(self):
        return {table: self.rows(f"SELECT * FROM {table} ORDER BY 1") for table in TABLES}

    def basic(self, user=None, password=None):
        user = self.admin_user if user is None else user
        password = self.admin_password if password is None else password
        return basic_auth(user, password)


def assert_error_envelope(status, headers, raw):
    """A 4xx with the JSON error envelope."""
    assert 400 <= status < 500, (status, raw[:300])
    assert (headers.get("Content-Type") or "").startswith("application/json"), raw[:300]
    error = json.loads(raw)["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    assert set(error) <= {"code", "message", "field", "fields"}
    if "fields" in error:       # every field at fault (issue 16): the first is `field`
        assert error["fields"][0] == {"field": error["field"], "message": error["message"]}
        assert all(set(entry) == {"field", "message"} for entry in error["fields"])
    return error


def check_response(server, before, status, headers, raw):
    """No 5xx; a rejection is a JSON error and changed nothing; returns the error or None."""
    assert status < 500, (status, raw[:300])
    assert headers.get("X-Request-ID"), headers
    if status < 400:
        return None
    error = assert_error_envelope(status, headers, raw)
    assert server.snapshot() == before, f"a rejected request ({status}) wrote to the database"
    return error


# Fixtures ####################################################################################

@pytest.fixture(scope="module")
def fuzz_api(tmp_path_factory):
    """One server for the fuzzers, with an origin, a route, an edge and its token."""
    server = HardenedServer(make_config(tmp_path_factory.mktemp("fuzz") / "kokoa.db"))
    server.origin = server.create_origin("fuzz-origin", "10.9.0.2")
    server.route = server.create_route("fuzz.example.com", server.origin["id"])
    server.edge_id, server.token = server.register_edge("fuzz-edge")
    yield server
    server.close()


@pytest.fixture
def api(tmp_path):
    server = HardenedServer(make_config(tmp_path / "kokoa.db"))
    yield server
    server.close()


# Bad input: hostile JSON #####################################################################

NEAR_MISSES = [
    "", " ", "null", "0", "x" * 65, "y" * 254, "a." * 127 + "b", "z" * 5000, "w" * 70000,
    "kokoa-ek-\ud800", "kokoa-ek-", "\ud800", "\udfff", "a\x00b", "\u202e", "\ufeff", "\x85",
    "\u2028", "🎉" * 40, "10.8.0.300", "fd00::1%eth0", "fd00::2%a b};", "::ffff:10.9.0.77",
    "127.0.0.1", "0.0.0.0", "::", "fe80::1", "224.0.0.1", "240.0.0.1", "10.9.0.2",
    "host:0", "[::1]:51820", "a.example:65536", "[fd00::1%x]:1", "a b:80", "A" * 43 + "=",
    "A" * 44, "xn--a.com", "Bücher.example", "*.example.com", "a..b", "-a.example",
    "a.example.", "1.2.3.4", "a.1-2", "a.123", "a_b.example", "a.example.com;", "$host.x.y",
    "a.example.com\ninclude /etc/passwd", "0" * 64, "G" * 64, "valid", "pending",
]
HOSTILE_TEXT = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(categories=["Cc", "Cs", "Cf", "Zl", "Zp", "Co"]), min_size=1,
            max_size=8),
    st.sampled_from(NEAR_MISSES),
    st.from_regex(r"[a-zA-Z0-9-]{1,12}(\.[a-zA-Z0-9-]{1,12}){1,3}\.?", fullmatch=True),
)
HOSTILE_NUMBER = st.one_of(
    st.integers(), st.floats(),
    st.sampled_from([0, -1, 1, 65535, 65536, 2 ** 31, 2 ** 63, -2 ** 63 - 1, 10 ** 30,
                     10 ** 300, 1e308, -0.0, 80.0]))
HOSTILE_JSON = st.recursive(
    st.none() | st.booleans() | HOSTILE_NUMBER | HOSTILE_TEXT,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(HOSTILE_TEXT, children, max_size=3),
    max_leaves=8)
STRING_FIELDS = {"name", "wg_ip", "wg_public_key", "wg_private_key", "wg_endpoint", "hostname",
                 "origin_id", "bootstrap_token", "applied_hash", "error", "description"}
INT_FIELDS = {"target_port", "expires_in", "uses"}
BOOL_FIELDS = {"acme_staging", "ok"}
DICT_FIELDS = {"certificates"}

ORIGIN_KEYS = ["name", "wg_ip", "wg_public_key", "wg_private_key", "wg_endpoint"]
ENDPOINTS = {
    "create_origin": ("POST", "/api/v1/origins", "admin", ORIGIN_KEYS),
    "patch_origin": ("PATCH", "/api/v1/origins/{origin}", "admin", ORIGIN_KEYS),
    "create_route": ("POST", "/api/v1/routes", "admin", ["hostname", "origin_id",
                                                         "target_port"]),
    "patch_route": ("PATCH", "/api/v1/routes/{route}", "admin", ["hostname", "origin_id",
                                                                 "target_port"]),
    "settings": ("PATCH", "/api/v1/settings", "admin", ["acme_staging"]),
    "register": ("POST", "/api/v1/edge-nodes/register", "none",
                 ["bootstrap_token", "name", "wg_public_key", "wg_ip", "wg_endpoint"]),
    "status": ("POST", "/api/v1/edge-nodes/me/status", "edge",
               ["applied_hash", "ok", "error", "certificates"]),
    "enrollment_key": ("POST", "/api/v1/enrollment-keys", "admin",
                       ["description", "expires_in", "uses"]),
}


def base_body(server, name, n):
    """A valid body for the endpoint, unique per example, that the fuzzer then spoils."""
    return {
        "create_origin": {"name": f"o{n}", "wg_ip": f"fd00::{n:x}:1"},
        "patch_origin": {},
        "create_route": {"hostname": f"h{n}.example.com", "origin_id": server.origin["id"],
                         "target_port": 8080},
        "patch_route": {},
        "settings": {"acme_staging": False},
        "register": {"bootstrap_token": server.bootstrap_token, "name": f"edge{n}"},
        "status": {"ok": True, "applied_hash": "0" * 64},
        "enrollment_key": {"description": "d"},
    }[name]


def wrong_type(field, value):
    """True if a non-null `value` has a JSON type that `field` never accepts."""
    if value is None:
        return False
    if field in STRING_FIELDS:
        return not isinstance(value, str)
    if field in INT_FIELDS:
        return isinstance(value, bool) or not isinstance(value, int)
    if field in BOOL_FIELDS:
        return not isinstance(value, bool)
    return field in DICT_FIELDS and not isinstance(value, dict)


def endpoint_request(server, name):
    method, path, auth, _ = ENDPOINTS[name]
    path = path.format(origin=server.origin["id"], route=server.route["id"])
    headers = {"Content-Type": "application/json"}
    if auth == "admin":
        headers["Authorization"] = server.basic()
    elif auth == "edge":
        headers["Authorization"] = f"Bearer {server.token}"
    return method, path, headers


@st.composite
def spoiled_bodies(draw, name):
    """(body bytes, {field: value}) with 1-3 fields replaced by hostile values."""
    fields = ENDPOINTS[name][3]
    keys = st.one_of(st.sampled_from(fields), st.sampled_from(["id", "__proto__", "x"]),
                     HOSTILE_TEXT)
    spoiled = draw(st.dictionaries(keys, HOSTILE_JSON, min_size=1, max_size=3))
    drop = draw(st.sets(st.sampled_from(fields), max_size=2))
    return spoiled, drop


def encode_body(base, spoiled, drop, style):
    body = {k: v for k, v in base.items() if k not in drop}
    body.update(spoiled)
    if style == "ascii":
        return json.dumps(body, ensure_ascii=True).encode()
    if style == "raw":       # lone surrogates become invalid UTF-8 bytes
        return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    key = next(iter(spoiled))   # "duplicate": the same key twice
    text = json.dumps(body)[:-1] + ("," if body else "") + f"{json.dumps(key)}:null}}"
    return text.encode()


@FUZZ
@given(data=st.data())
@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_hostile_json_fields_never_5xx_and_rejections_change_nothing(fuzz_api, name, data):
    spoiled, drop = data.draw(spoiled_bodies(name))
    style = data.draw(st.sampled_from(["ascii", "ascii", "raw", "duplicate"]))
    n = next(_SOURCES)
    raw = encode_body(base_body(fuzz_api, name, n), spoiled, drop, style)
    method, path, headers = endpoint_request(fuzz_api, name)
    before = fuzz_api.snapshot()
    status, got_headers, answer = send(fuzz_api.url, method, path, raw, headers, next_source())
    error = check_response(fuzz_api, before, status, got_headers, answer)
    if style == "duplicate":
        assert status == 400 and error["code"] == "invalid_json"
    bad = [f for f, v in spoiled.items() if f in ENDPOINTS[name][3] and wrong_type(f, v)]
    if bad and style == "ascii":
        assert status in ((400, 401) if name == "register" else (400,)), (bad, answer)



def test_every_near_miss_in_every_field_of_every_endpoint(fuzz_api):
    """The hypothesis runs sample; this table is exhaustive: each near miss, each field."""
    numbers = [0, -1, 65536, 2 ** 63, 10 ** 300, 1.5, 80.0, True, "80", [], {}]
    done = set()
    before = fuzz_api.snapshot()
    for name in ("register", *sorted(ENDPOINTS)):
        method, path, headers = endpoint_request(fuzz_api, name)
        for field in sorted(set(ENDPOINTS[name][3]) - done):
            done.add(field)
            values = NEAR_MISSES if field in STRING_FIELDS else numbers
            for value in values + [None, values[:3], {"a": 1}]:
                body = {**base_body(fuzz_api, name, next(_SOURCES)), field: value}
                status, got_headers, answer = send(fuzz_api.url, method, path,
                                                   json.dumps(body).encode(), headers,
                                                   next_source())
                check_response(fuzz_api, before, status, got_headers, answer)
                if status < 400:
                    before = fuzz_api.snapshot()


@pytest.mark.parametrize("length", ["²", "١٢", "-1", "1e3", " 5", "0x10", "+0", "5 ", "",
                                    "99999999999999999999999", "9" * 5000])
def test_malformed_content_length_in_the_environ_is_a_json_4xx(fuzz_api, length):
    method, path, headers, body = target_request(fuzz_api, HEADER_TARGETS[1], {})
    environ = wsgi_environ(method, path, body, headers["Authorization"], next_source())
    environ["CONTENT_LENGTH"] = length
    before = fuzz_api.snapshot()
    status, got_headers, answer = call_wsgi(fuzz_api.app, environ)
    check_response(fuzz_api, before, status, got_headers, answer)
    assert status in (400, 413) or (length == "" and status == 415)


@pytest.mark.parametrize("method, path, body, status, field", [
    ("POST", "/api/v1/origins", {"name": "z1", "wg_ip": "fd00::9%eth0"}, 400, "wg_ip"),
    ("PATCH", "/api/v1/origins/{origin}", {"wg_ip": "fd00::9%a;b}"}, 400, "wg_ip"),
    ("POST", "/api/v1/edge-nodes/register", {"name": "z2", "wg_ip": "fd00::9%x"}, 400, "wg_ip"),
    ("POST", "/api/v1/routes", {"hostname": "a.1-2", "target_port": 80}, 400, "hostname"),
    ("POST", "/api/v1/routes", {"hostname": "a.b.9-9", "target_port": 80}, 400, "hostname"),
    ("POST", "/api/v1/enrollment-keys", {"description": []}, 400, "description"),
    ("POST", "/api/v1/enrollment-keys", {"description": 0}, 400, "description"),
    ("POST", "/api/v1/edge-nodes/register", {"name": "z3", "bootstrap_token": "kokoa-ek-\ud800"},
     401, "bootstrap_token"),
])
def test_regressions_found_by_the_fuzzers(fuzz_api, method, path, body, status, field):
    path = path.format(origin=fuzz_api.origin["id"])
    if path.endswith("/routes"):
        body = {**body, "origin_id": fuzz_api.origin["id"]}
    if path.endswith("/register"):
        body = {"bootstrap_token": fuzz_api.bootstrap_token, **body}
    headers = {"Content-Type": "application/json", "Authorization": fuzz_api.basic()}
    before = fuzz_api.snapshot()
    got, got_headers, answer = send(fuzz_api.url, method, path, json.dumps(body).encode(),
                                    headers, next_source())
    error = check_response(fuzz_api, before, got, got_headers, answer)
    assert got == status and error["field"] == field, answer

RAW_BODIES = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"", b"{", b"[]", b"null", b"1", b'"x"', b"\xef\xbb\xbf{}", b"{}\x00",
                     b'{"a":1}{"b":2}', b'{"name": "\xff\xfe"}', b'{"\xed\xa0\x80": 1}',
                     b'{"name": NaN}', b'{"target_port": Infinity}', b'{"a": 1e99999}',
                     b'{"a": ' + b"9" * 5000 + b"}", b"[" * 50000 + b"]" * 50000,
                     b'{"a":' * 3000 + b"1" + b"}" * 3000, b"\n" * 1000]),
    st.integers(1, 100000).map(lambda n: b"[" * n),
)


@FUZZ
@given(raw=RAW_BODIES)
@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_malformed_bodies_are_a_json_400_and_change_nothing(fuzz_api, name, raw):
    method, path, headers = endpoint_request(fuzz_api, name)
    before = fuzz_api.snapshot()
    status, got_headers, answer = send(fuzz_api.url, method, path, raw, headers, next_source())
    check_response(fuzz_api, before, status, got_headers, answer)
    with contextlib.suppress(ValueError, RecursionError):
        if isinstance(json.loads(raw), dict):
            return
    assert status in ((400, 401) if name == "register" else (400,)), answer[:200]


# Bad input: hostile headers ##################################################################

LATIN1 = st.text(st.characters(min_codepoint=0, max_codepoint=255,
                               exclude_characters="\r\n"), max_size=60)
HEADER_VALUES = {
    "Authorization": st.one_of(
        LATIN1, st.builds(lambda s: "Basic " + s, LATIN1),
        st.builds(lambda s: "Bearer " + s, LATIN1),
        st.binary(max_size=80).map(lambda b: "Basic " + base64.b64encode(b).decode()),
        st.sampled_from(["Basic", "Bearer", "Bearer  ", "Basic ===", "Digest x", "Basic " +
                         base64.b64encode(b"admin:\xff\xfe").decode(), "Bearer " + "a" * 9000,
                         "bearer " + "x" * 43, "Basic " + base64.b64encode(b":").decode()])),
    "If-None-Match": st.one_of(LATIN1, st.sampled_from(
        ["*", 'W/"x"', '"' * 300, "," * 5000, "x" * 9000, 'W/', '""'])),
    "X-Request-ID": st.one_of(LATIN1, st.sampled_from(["x" * 129, "x" * 128, "a b", "-", "\x00"])),
    "Content-Type": st.one_of(LATIN1, st.sampled_from(
        ["application/json; charset=latin-1", "APPLICATION/JSON", "application/json;;;",
         "text/plain", "application/jsonx", "application/json\x00", ""])),
    "X-Junk": st.sampled_from(["x" * 8000, "y" * 70000, "\x01\x7f\xff"]),
}
HEADER_TARGETS = [("GET", "/api/v1/edge-nodes/me/config", "edge"),
                  ("POST", "/api/v1/origins", "admin"), ("GET", "/api/v1/origins", "admin"),
                  ("POST", "/api/v1/edge-nodes/me/status", "edge")]


def raw_http(url, request_bytes, source):
    """Send bytes as they are (no client-side header checks); returns (status, headers, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20,
                                  source_address=(source, 0)) as sock:
        sock.sendall(request_bytes)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.headers, resp.read()


def target_request(server, target, hostile):
    method, path, auth = target
    body = b""
    if method == "POST":
        body = json.dumps({"ok": True} if auth == "edge" else {"name": "h", "wg_ip": "10.9.9"}
                          ).encode()
    headers = {"Host": "127.0.0.1", "Connection": "close", "Content-Type": "application/json",
               "Authorization": server.basic() if auth == "admin" else f"Bearer {server.token}"}
    headers.update(hostile)
    return method, path, headers, body


@FUZZ
@given(target=st.sampled_from(HEADER_TARGETS),
       hostile=st.dictionaries(st.sampled_from(sorted(HEADER_VALUES)), st.just(None),
                               min_size=1, max_size=3).flatmap(
           lambda keys: st.fixed_dictionaries({k: HEADER_VALUES[k] for k in keys})),
       length=st.one_of(st.none(), st.sampled_from(["abc", "-1", "1e3", "²", "0x10", "+0",
                                                    "short"])))
def test_hostile_headers_through_waitress_never_5xx(fuzz_api, target, hostile, length):
    method, path, headers, body = target_request(fuzz_api, target, hostile)
    headers["Content-Length"] = str(len(body)) if length is None else length
    if length == "short":
        headers["Content-Length"] = str(max(0, len(body) - 3))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    before = fuzz_api.snapshot()
    status, got_headers, answer = raw_http(fuzz_api.url, (head + "\r\n").encode("latin-1") + body,
                                           next_source())
    assert status < 500, (status, answer[:200])
    if got_headers.get("X-Request-ID"):        # the app answered (not waitress' own 400/431)
        check_response(fuzz_api, before, status, got_headers, answer)
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", got_headers["X-Request-ID"])
    else:
        assert 400 <= status < 500 and fuzz_api.snapshot() == before


def wsgi_environ(method, path, body, authorization, client):
    """A WSGI environ as a server would build it for this request."""
    environ = {"REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path,
               "QUERY_STRING": "", "SERVER_NAME": "kokoa", "SERVER_PORT": "80",
               "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": client, "HTTP_HOST": "localhost",
               "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
               "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
               "wsgi.errors": io.StringIO(), "wsgi.multithread": True,
               "wsgi.multiprocess": False, "wsgi.run_once": False}
    if authorization is not None:
        environ["HTTP_AUTHORIZATION"] = authorization
    return environ


def call_wsgi(app, environ):
    """Call a WSGI app in-process; returns (status int, headers dict, body bytes)."""
    captured = {}

    def start_response(status, headers, exc_info=None):
        captured["status"], captured["headers"] = int(status.split()[0]), dict(headers)
        return lambda data: None
    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        if hasattr(result, "close"):        # as a WSGI server must (wsgiref.validate checks)
            result.close()
    return captured["status"], captured["headers"], body


@FUZZ
@given(target=st.sampled_from(HEADER_TARGETS),
       hostile=st.fixed_dictionaries({}, optional={
           "HTTP_AUTHORIZATION": HEADER_VALUES["Authorization"],
           "HTTP_IF_NONE_MATCH": HEADER_VALUES["If-None-Match"],
           "HTTP_X_REQUEST_ID": HEADER_VALUES["X-Request-ID"],
           "CONTENT_TYPE": HEADER_VALUES["Content-Type"],
           "CONTENT_LENGTH": st.one_of(LATIN1, st.sampled_from(
               ["²", "١٢", "-1", "1e3", " 5", "99999999999999999999999", "", "0"]))}))
def test_hostile_headers_in_the_wsgi_environ_get_json_errors(fuzz_api, target, hostile):
    """What another WSGI server might pass through: the app itself must answer with JSON."""
    method, path, headers, body = target_request(fuzz_api, target, {})
    environ = wsgi_environ(method, path, body, headers["Authorization"], next_source())
    environ.update(hostile)
    length = environ["CONTENT_LENGTH"]
    app = validator(fuzz_api.app) if length.isascii() and length.isdigit() else fuzz_api.app
    before = fuzz_api.snapshot()
    status, got_headers, answer = call_wsgi(app, environ)
    check_response(fuzz_api, before, status, got_headers, answer)


# Invariant: every served nginx_map passes nginx -t ###########################################

MACHINE_HOSTNAMES = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-zA-Z0-9-]{1,10}){1,3}\.?",
                  fullmatch=True),
    st.sampled_from(["Bücher.Example.", "a.1-2", "a.123", "xn--bcher-kva.example", "münchen.de",
                     "a" * 63 + ".example.com", ".".join(["b" * 63] * 3 + ["c" * 61]),
                     "-bad.example", "a..b", "*.example.com", "a.example.com;", "$host.a.b",
                     "1.2.3.4", "[::1]", "ß.example", "a_b.example", "é.香港", "a.b-"]),
    st.text(st.sampled_from("abXÜ.-_;{} $\n019*"), max_size=25),
)
MACHINE_IPS = st.one_of(
    st.ip_addresses(v=4, network="10.0.0.0/8").map(str),
    st.ip_addresses(v=6, network="fd00::/16").map(str),
    st.sampled_from(["fd00::7%eth0", "fd00::8%a;b}", "::ffff:10.9.0.7", "10.9.0.300",
                     "127.0.0.1", "fe80::1", "0.0.0.0", "10.9.0.2"]),
)
NGINX_RUNS = {"left": 20}


class ConfigMachine(RuleBasedStateMachine):
    """Random valid and invalid API calls; every served config stays safe for nginx."""

    origins = Bundle("origins")
    routes = Bundle("routes")

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kokoa-inv-"))
        self.server = HardenedServer(make_config(self.dir / "kokoa.db"))
        _, self.token = self.server.register_edge("inv-edge")
        self.last_config = None

    def call(self, method, path, body=None):
        status, _, answer = self.server.request(method, path, body)
        assert status < 500, (method, path, body, answer)
        return status, answer

    @initialize(target=routes)
    def seed_route(self):
        """Start every run with one valid route, so that there is a map for nginx -t."""
        status, origin = self.call("POST", "/api/v1/origins",
                                   {"name": "seed", "wg_ip": "172.31.250.1"})
        assert status == 201, origin
        status, route = self.call("POST", "/api/v1/routes", {
            "hostname": "seed.example.com", "origin_id": origin["id"], "target_port": 8080})
        assert status == 201, route
        return route["id"]

    @rule(target=origins, name=st.text(max_size=8), wg_ip=MACHINE_IPS,
          endpoint=st.sampled_from([None, "o.example.net:51820", "[fd00::1]:51820", "x"]))
    def create_origin(self, name, wg_ip, endpoint):
        status, answer = self.call("POST", "/api/v1/origins", {
            "name": name or "o", "wg_ip": wg_ip, "wg_endpoint": endpoint})
        return answer["id"] if status == 201 else multiple()

    @rule(target=routes, origin=origins, hostname=MACHINE_HOSTNAMES,
          port=st.integers(0, 70000))
    def create_route(self, origin, hostname, port):
        status, answer = self.call("POST", "/api/v1/routes", {
            "hostname": hostname, "origin_id": origin, "target_port": port})
        return answer["id"] if status == 201 else multiple()

    @rule(route=routes, hostname=MACHINE_HOSTNAMES, port=st.integers(1, 65535))
    def patch_route(self, route, hostname, port):
        self.call("PATCH", f"/api/v1/routes/{route}", {"hostname": hostname,
                                                       "target_port": port})

    @rule(origin=origins, wg_ip=MACHINE_IPS)
    def patch_origin(self, origin, wg_ip):
        self.call("PATCH", f"/api/v1/origins/{origin}", {"wg_ip": wg_ip})

    @rule(route=consumes(routes))
    def delete_route(self, route):
        self.call("DELETE", f"/api/v1/routes/{route}")

    @rule(origin=origins)
    def delete_origin(self, origin):
        self.call("DELETE", f"/api/v1/origins/{origin}")

    @rule(staging=st.booleans())
    def set_staging(self, staging):
        self.call("PATCH", "/api/v1/settings", {"acme_staging": staging})

    @rule(path=st.sampled_from(["/api/v1/routes", "/api/v1/origins", "/api/v1/settings"]),
          body=HOSTILE_JSON)
    def post_garbage(self, path, body):
        self.call("PATCH" if path.endswith("settings") else "POST", path, body)

    @invariant()
    def served_config_is_safe(self):
        status, headers, config = self.server.my_config(self.token)
        assert status == 200, config
        assert headers["ETag"] == f'"{config["config_hash"]}"'
        accepted = dict(zip(config["hostnames"], agent_is_host(config["hostnames"]), strict=True))
        assert all(accepted.values()), accepted         # by the agent's own jq grammar
        entries = re.findall(r"^    (\S+) kokoa_\w+;$", config["nginx_map"], re.M)
        assert sorted(entries) == config["hostnames"]
        self.last_config = config

    def teardown(self):
        try:
            if self.last_config and self.last_config["hostnames"] and NGINX_RUNS["left"] > 0:
                NGINX_RUNS["left"] -= 1
                prefix = self.dir / "nginx"
                write_nginx_prefix(prefix, self.last_config["nginx_map"], free_port())
                result = nginx_test(prefix)
                assert result.returncode == 0, result.stderr
                assert "[warn]" not in result.stderr and "[emerg]" not in result.stderr
        finally:
            self.server.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def test_every_served_nginx_map_passes_nginx_t_whatever_the_calls():
    require_tools("nginx", "jq")
    NGINX_RUNS["left"] = 20
    ConfigMachine.TestCase.settings = settings(
        max_examples=30, stateful_step_count=25, deadline=None, derandomize=True,
        database=None, suppress_health_check=list(HealthCheck))
    ConfigMachine.TestCase().runTest()
    assert NGINX_RUNS["left"] < 20, "no run served a map with routes: nginx -t never ran"


# Faults: kill -9 during writes ###############################################################

def write_pair(server, i, acked, lock):
    """Create origin i and a route to it; note every write answered 2xx."""
    try:
        status, _, origin = server.request("POST", "/api/v1/origins", {
            "name": f"k{i}", "wg_ip": f"fd01::{i:x}:1"})
        if status != 201:
            return
        with lock:
            acked["origins"][origin["id"]] = f"k{i}"
        status, _, route = server.request("POST", "/api/v1/routes", {
            "hostname": f"k{i}.example.com", "origin_id": origin["id"], "target_port": 80})
        if status == 201:
            with lock:
                acked["routes"][route["id"]] = origin["id"]
    except OSError:            # the server died under us: this write was not acknowledged
        return


def test_kill_9_during_concurrent_writes_loses_nothing_acknowledged(tmp_path):
    server = KokoaServer(tmp_path)
    server.extra_args = ["--threads", "8"]
    server.start()
    acked, lock = {"origins": {}, "routes": {}}, threading.Lock()
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            for i in range(500):
                pool.submit(write_pair, server, i, acked, lock)
            wait_until(lambda: len(acked["origins"]) + len(acked["routes"]) >= 300,
                       timeout=90, what="300 acknowledged writes")
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)
        assert 300 <= len(acked["origins"]) + len(acked["routes"]) < 1000
        db = sqlite3.connect(server.db)
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("PRAGMA foreign_key_check").fetchall() == []
            origins = dict(db.execute("SELECT id, name FROM origins").fetchall())
            routes = dict(db.execute("SELECT id, origin_id FROM routes").fetchall())
        finally:
            db.close()
        assert acked["origins"].items() <= origins.items()
        assert acked["routes"].items() <= routes.items()
        server.start()
        check_consistent_after_restart(server, origins, routes)
    finally:
        server.stop()


def check_consistent_after_restart(server, origins, routes):
    listed = server.request("GET", "/api/v1/origins")[2]["origins"]
    assert {o["id"] for o in listed} == set(origins)
    per_origin = {o["id"]: o["route_count"] for o in listed}
    for origin_id in origins:
        assert per_origin[origin_id] == list(routes.values()).count(origin_id)
    listed_routes = server.request("GET", "/api/v1/routes")[2]["routes"]
    assert {r["id"]: r["origin_id"] for r in listed_routes} == routes
    _, token = server.register_edge("after-crash")
    config = server.request("GET", "/api/v1/edge-nodes/me/config", auth=token)[2]
    assert config["hostnames"] == sorted(r["hostname"] for r in listed_routes)
    status, _, _ = server.request("POST", "/api/v1/origins", {"name": "after",
                                                              "wg_ip": "10.9.1.1"})
    assert status == 201


# Faults: read-only filesystem, full disk #####################################################

@contextlib.contextmanager
def tmpfs(path, size):
    """A small tmpfs mounted at `path` for the duration; always unmounted."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                    f"kokoa-test-{uuid.uuid4().hex[:8]}", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill_up(directory):
    """Write to a file in `directory` until the filesystem is full; returns its path."""
    filler = directory / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as handle:
        for _ in range(100000):
            handle.write(b"\0" * 65536)
            handle.flush()
    with contextlib.suppress(OSError), open(filler, "ab") as handle:
        for _ in range(100000):
            handle.write(b"\0" * 512)
            handle.flush()
    return filler


def check_degraded(server, token, origin_id):
    """Reads and polls keep working; writes are a clear 503 JSON error."""
    assert server.request("GET", "/api/v1/origins")[0] == 200
    for method, path, body in [
            ("POST", "/api/v1/origins", {"name": "new", "wg_ip": "10.9.3.3"}),
            ("POST", "/api/v1/routes", {"hostname": "new.example.com", "origin_id": origin_id,
                                        "target_port": 80}),
            ("PATCH", "/api/v1/settings", {"acme_staging": True}),
            ("POST", "/api/v1/enrollment-keys", {})]:
        status, headers, error = server.request(method, path, body)
        assert status == 503, (path, status, error)
        assert error["error"]["code"] == "unavailable" and headers["Retry-After"]
        assert "read-only or the disk is full" in error["error"]["message"]
    assert server.request("GET", "/healthz", auth=None)[0] == 200
    origins = server.request("GET", "/api/v1/origins")
    assert origins[0] == 200 and [o["id"] for o in origins[2]["origins"]] == [origin_id]
    assert server.request("GET", "/api/v1/routes")[0] == 200
    assert server.request("GET", "/api/v1/edge-nodes")[0] == 200
    status, _, config = server.request("GET", "/api/v1/edge-nodes/me/config", auth=token)
    assert status == 200 and config["hostnames"] == ["app.example.com"]
    assert server.proc.poll() is None


@pytest.mark.parametrize("fault", ["read-only", "disk-full"])
def test_read_only_or_full_disk_refuses_writes_and_keeps_reads(tmp_path, fault):
    require_root()
    with tmpfs(tmp_path / "mnt", "2m") as mnt:
        server = KokoaServer(tmp_path)
        server.db = mnt / "kokoa.db"
        server.start()
        try:
            origin = server.request("POST", "/api/v1/origins", {"name": "home",
                                                                "wg_ip": "10.9.0.2"})[2]
            server.request("POST", "/api/v1/routes", {"hostname": "app.example.com",
                                                      "origin_id": origin["id"],
                                                      "target_port": 80})
            _, token = server.register_edge("edge1")
            if fault == "read-only":
                subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            else:
                filler = fill_up(mnt)
            check_degraded(server, token, origin["id"])
            if fault == "read-only":
                subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
            else:
                filler.unlink()
            status, _, _ = server.request("POST", "/api/v1/origins", {"name": "again",
                                                                      "wg_ip": "10.9.3.4"})
            assert status == 201
        finally:
            server.stop()


# Security: every route refuses the wrong credentials #########################################

ROUTE_SAMPLE_VALUES = {"name": "app.js"}


def concrete_path(entry, ids):
    """A real path for a route pattern, with ids of existing rows where it takes one."""
    def value(match):
        param = match.group(1)
        if param == "id":
            return ids.get(entry.pattern.split("/")[3], str(uuid.uuid4()))
        return ROUTE_SAMPLE_VALUES.get(param, "x")
    return re.sub(r"<(?:int:)?(\w+)>", value, entry.pattern)


def refuse_cases(server, revoked_token, live_token):
    return {
        "no credentials": {},
        "wrong password": {"Authorization": server.basic(password="wrong")},
        "wrong user": {"Authorization": server.basic(user="root")},
        "empty password": {"Authorization": server.basic(password="")},
        "password as bearer": {"Authorization": f"Bearer {server.admin_password}"},
        "edge token": {"Authorization": f"Bearer {live_token}"},
        "edge token as basic": {"Authorization": server.basic(password=live_token)},
        "revoked edge token": {"Authorization": f"Bearer {revoked_token}"},
        "bootstrap token": {"Authorization": f"Bearer {server.bootstrap_token}"},
    }


def security_fixture(api):
    origin = api.create_origin()
    route = api.create_route("sec.example.com", origin["id"])
    status, _, key = api.request("POST", "/api/v1/enrollment-keys", {})
    assert status == 201
    live_id, live_token = api.register_edge("live")
    revoked_id, revoked_token = api.register_edge("revoked")
    assert api.request("DELETE", f"/api/v1/edge-nodes/{revoked_id}")[0] == 204
    ids = {"origins": origin["id"], "routes": route["id"], "edge-nodes": live_id,
           "enrollment-keys": key["id"]}
    return ids, live_token, revoked_token


def test_every_route_has_a_known_auth_kind_and_only_these_are_public():
    kinds = {(entry.method, entry.pattern): entry.auth for entry in kokoa.ROUTES}
    assert set(kinds.values()) <= {"admin", "edge", "origin", "local_or_admin", "none"}
    # the login (it checks the credentials in its body) and the UI's shell, which holds no
    # data: its login page must load before anyone has logged in (issue 16); the CA reads
    # HTTP-01 tokens (through any edge) without credentials (issue 15)
    assert {key for key, kind in kinds.items() if kind == "none"} == {
        ("GET", "/healthz"), ("POST", "/api/v1/edge-nodes/register"),
        ("POST", "/api/v1/session"), ("GET", "/"), ("GET", "/static/<name>"),
        ("GET", "/install/<name>"),       # the served installers hold no secret
        ("GET", "/.well-known/acme-challenge/<token>")}
    me = "/api/v1/edge-nodes/me"
    assert {key for key, kind in kinds.items() if kind == "edge"} == {
        ("GET", f"{me}/config"), ("POST", f"{me}/status"), ("GET", f"{me}/certificates"),
        ("POST", f"{me}/certificates/<name>/claim"), ("PUT", f"{me}/certificates/<name>"),
        ("POST", f"{me}/certificates/<name>/failure"),
        ("PUT", f"{me}/acme-challenges/<token>"), ("DELETE", f"{me}/acme-challenges/<token>"),
        ("PUT", f"{me}/dns-challenges/<name>"), ("DELETE", f"{me}/dns-challenges/<name>")}
    assert {key for key, kind in kinds.items() if kind == "origin"} == {
        ("GET", "/api/v1/origins/me/wireguard.conf")}


def test_every_admin_route_refuses_everything_but_the_admin(api):
    # ~80 wrong logins from as many addresses: the fleet-wide slow-down (test_security.py)
    # would answer most with 429; here each must be refused on its own merits
    api.app.admin_slowdown = kokoa.FailureSlowdown(threshold=10_000)
    ids, live_token, revoked_token = security_fixture(api)
    cases = refuse_cases(api, revoked_token, live_token)
    checked = 0
    for number, entry in enumerate(kokoa.ROUTES):
        if entry.auth not in ("admin", "local_or_admin"):
            continue
        path = concrete_path(entry, ids)
        body = b"{}" if entry.method in ("POST", "PATCH", "PUT") else b""
        for case_number, (case, headers) in enumerate(cases.items()):
            headers = {**headers, "Content-Type": "application/json"}
            before = api.snapshot()
            status, got_headers, raw = send(api.url, entry.method, path, body, headers,
                                            source=f"127.55.{number}.{case_number + 1}")
            if entry.auth == "local_or_admin":     # loopback is trusted: ask as a remote
                status, got_headers, raw = remote_call(api, entry.method, path, body, headers)
            assert status == 401, (entry.method, path, case, raw[:200])
            assert_error_envelope(status, got_headers, raw)
            assert api.snapshot() == before, (entry.method, path, case)
            checked += 1
        status, _, raw = api.request(entry.method, path, {} if body else None)
        assert status != 401, (entry.method, path, raw)
    admin = [e for e in kokoa.ROUTES if e.auth in ("admin", "local_or_admin")]
    assert len(admin) >= 17 and checked == len(admin) * len(cases)


def remote_call(api, method, path, body, headers):
    """The app called in-process as if from a non-loopback peer (no packet leaves the host)."""
    environ = wsgi_environ(method, path, body, headers.get("Authorization"), "203.0.113.9")
    return call_wsgi(validator(api.app), environ)


def test_edge_routes_refuse_admin_and_revoked_and_act_only_as_the_caller(api):
    ids, token_a, revoked_token = security_fixture(api)
    _, token_b = api.register_edge("edge-b")
    status_body = json.dumps({"ok": True, "applied_hash": "a" * 64}).encode()
    for index, entry in enumerate([e for e in kokoa.ROUTES if e.auth == "edge"]):
        body = status_body if entry.method == "POST" else b""
        for headers in ({"Authorization": api.basic()}, {},
                        {"Authorization": f"Bearer {revoked_token}"},
                        {"Authorization": f"Basic {token_a}"},
                        {"Authorization": f"Bearer {token_a}x"}):
            before = api.snapshot()
            status, got_headers, raw = send(api.url, entry.method, entry.pattern, body,
                                            {**headers, "Content-Type": "application/json"},
                                            source=f"127.56.0.{index + 1}")  # under the limit
            assert status == 401, (entry.pattern, headers, raw)
            assert_error_envelope(status, got_headers, raw)
            assert api.snapshot() == before
    assert api.request("POST", "/api/v1/edge-nodes/me/status", {
        "ok": False, "applied_hash": "a" * 64, "error": "edge A broke"}, auth=token_a)[0] == 204
    edge_a = api.rows("SELECT * FROM edge_nodes WHERE id = ?", (ids["edge-nodes"],))
    assert api.request("POST", "/api/v1/edge-nodes/me/status", {
        "ok": True, "applied_hash": "b" * 64, "certificates": {
            "sec.example.com": {"status": "valid"}}}, auth=token_b)[0] == 204
    assert api.rows("SELECT * FROM edge_nodes WHERE id = ?", (ids["edge-nodes"],)) == edge_a
    edges = {e["name"]: e for e in api.request("GET", "/api/v1/edge-nodes")[2]["edge_nodes"]}
    assert edges["live"]["last_error"] == "edge A broke" and edges["live"]["certificates"] == {}
    assert edges["edge-b"]["applied_hash"] == "b" * 64 and edges["edge-b"]["status_ok"]


def test_a_thousand_wrong_bootstrap_tokens_are_throttled_but_others_still_register(api):
    body = json.dumps({"bootstrap_token": "wrong", "name": "x"}).encode()
    headers = {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", int(api.url.rsplit(":", 1)[1]), timeout=10,
                                      source_address=("127.0.0.9", 0))
    statuses = []
    try:
        for _ in range(1000):
            conn.request("POST", "/api/v1/edge-nodes/register", body, headers)
            resp = conn.getresponse()
            error = json.loads(resp.read())["error"]
            statuses.append(resp.status)
            if resp.status == 429:
                assert int(resp.headers["Retry-After"]) >= 1 and error["code"]
    finally:
        conn.close()
    limit = kokoa.AUTH_FAILURE_LIMIT
    assert statuses == [401] * limit + [429] * (1000 - limit)
    good = json.dumps({"bootstrap_token": api.bootstrap_token, "name": "good"}).encode()
    assert send(api.url, "POST", "/api/v1/edge-nodes/register", good, headers,
                source="127.0.0.9")[0] == 429
    status, _, created = send(api.url, "POST", "/api/v1/edge-nodes/register", good, headers,
                              source="127.0.0.10")
    assert status == 201 and json.loads(created)["token"]
    assert [row[0] for row in api.rows("SELECT name FROM edge_nodes")] == ["good"]


# Security: nothing secret in the logs ########################################################

def secret_workload(client, source_for=None):
    """Exercise every secret-bearing path; returns the secrets that went over the wire."""
    private, public = wg_keypair()
    secrets_seen = [client.admin_password, client.bootstrap_token, private, "Wr0ngPassw0rd!"]
    origin = client.request("POST", "/api/v1/origins", {
        "name": "home", "wg_ip": "10.9.0.2", "wg_private_key": private,
        "wg_public_key": public})[2]
    generated = client.request("POST", "/api/v1/origins", {"name": "gen", "wg_ip": "10.9.0.3"})[2]
    for origin_id in (origin["id"], generated["id"]):
        conf = client.request("GET", f"/api/v1/origins/{origin_id}/wireguard.conf")[2].decode()
        secrets_seen += re.findall(r"^PrivateKey = (\S+)$", conf, re.M)
    client.request("POST", "/api/v1/routes", {"hostname": "s.example.com",
                                              "origin_id": origin["id"], "target_port": 80})
    key = client.request("POST", "/api/v1/enrollment-keys", {"uses": 2})[2]["key"]
    secrets_seen.append(key)
    passwords = ["policy password one", "policy password two", "refused password three"]
    password_hash = kokoa.sha512_crypt("policy password four")
    policy = client.request("POST", "/api/v1/access-policies", {"name": "family", "users": [
        {"username": "alice", "password": passwords[0]},
        {"username": "bob", "password_hash": password_hash}]})[2]
    client.request("PATCH", f"/api/v1/access-policies/{policy['id']}", {"users": [
        {"username": "alice"}, {"username": "carol", "password": passwords[1]}]})
    client.request("PATCH", f"/api/v1/access-policies/{policy['id']}", {"users": [
        {"username": "bad name", "password": passwords[2]}]})
    db = sqlite3.connect(client.db if isinstance(client, KokoaServer) else client.config.db_path)
    stored = [user["hash"] for (text,) in db.execute("SELECT users FROM access_policies")
              for user in json.loads(text)]
    db.close()
    assert len(stored) == 2          # alice (kept) and carol; bob was dropped
    secrets_seen += passwords + [password_hash] + stored
    tokens = []
    for name, credential in (("e1", client.bootstrap_token), ("e2", key), ("e3", key)):
        status, _, edge = client.request("POST", "/api/v1/edge-nodes/register", {
            "bootstrap_token": credential, "name": name}, auth=None)
        assert status == 201, edge
        tokens.append((edge["id"], edge["token"]))
    secrets_seen += [token for _, token in tokens]
    client.request("POST", "/api/v1/edge-nodes/register", {"bootstrap_token": key,
                                                           "name": "spent"}, auth=None)
    client.request("POST", "/api/v1/edge-nodes/register", {
        "bootstrap_token": client.bootstrap_token + "x", "name": "bad"}, auth=None)
    for _, token in tokens:
        client.request("GET", "/api/v1/edge-nodes/me/config", auth=token)
        client.request("POST", "/api/v1/edge-nodes/me/status", {"ok": False,
                                                                "error": "boom"}, auth=token)
    client.request("GET", "/api/v1/edge-nodes/me/config", auth=tokens[0][1] + "x")
    client.request("GET", "/api/v1/edge-nodes/me/config",
                   headers={"Authorization": f"Bearer {client.admin_password}"}, auth=None)
    client.request("DELETE", f"/api/v1/edge-nodes/{tokens[0][0]}")
    client.request("GET", "/api/v1/edge-nodes/me/config", auth=tokens[0][1])
    password, client.admin_password = client.admin_password, "Wr0ngPassw0rd!"
    client.request("GET", "/api/v1/origins")
    client.admin_password = password
    client.request("POST", "/api/v1/origins", b'{"wg_private_key": "' + private.encode() + b'"',
                   headers={"Content-Type": "application/json"})
    return [s for s in secrets_seen if s]


def assert_no_secret(text, secrets_used):
    assert text.strip(), "the log is empty: nothing was checked"
    for secret in secrets_used:
        assert secret not in text, f"a secret ({secret[:4]}...) appears in the log"
        for variant in (base64.b64encode(secret.encode()).decode(), json.dumps(secret)[1:-1]):
            assert variant not in text


def test_nothing_secret_in_the_in_process_log(api):
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(kokoa.JsonLogFormatter())
    loggers = [logging.getLogger(name) for name in ("kokoa", "waitress", "")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        used = secret_workload(api) + [api.config.keyring.current.hex()]
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    assert_no_secret(handler.stream.getvalue(), used)


def test_nothing_secret_in_the_log_of_a_real_server(tmp_path):
    server = KokoaServer(tmp_path, {"KOKOA_LOG_LEVEL": "DEBUG"}).start()
    try:
        used = secret_workload(server) + [server.secret]
    finally:
        server.stop()
    text = server.log_path.read_text(errors="replace")
    assert '"msg": "request"' in text
    assert_no_secret(text, used)

