"""Access policies on the control plane (issue 14, DESIGN.md "Access policies"): the API and
its validation, the SHA-512-crypt hashes it makes, the schema-2 payload that carries them, the
schema-1 payload that leaves a protected route out, and restore's checks of policy rows.

The edge half (nginx enforcing a policy) is tested with the agent.
"""

import ctypes
import ctypes.util
import json
import subprocess
from pathlib import Path

import pytest

import kokoa
from conftest import (
    InProcessServer,
    edited_backup,
    make_config,
    remember_secret,
    require_tools,
    run_cli,
)

AGENT_HEADER = {"X-Kokoa-Agent": f"{kokoa.__version__}; schema=1,2"}
PASSWORD = "correct horse battery staple"
# `openssl passwd -6 -salt saltsalt password`
KNOWN_HASH = ("$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc."
              "eoxqOmSuNp2xS0ktL3nh/")
BCRYPT_HASH = "$2y$05$" + "a" * 22 + "b" * 31
remember_secret(PASSWORD, KNOWN_HASH, BCRYPT_HASH)


def create_policy(api, expected=201, **fields):
    body = {"name": "family", "users": [{"username": "alice", "password": PASSWORD}], **fields}
    status, _, answer = api.request("POST", "/api/v1/access-policies", body)
    assert status == expected, answer
    return answer


def stored_policy(api, policy_id):
    """The raw access_policies row (what a backup holds) as a dict."""
    db = kokoa.connect(api.config.db_path)
    try:
        return dict(db.execute("SELECT * FROM access_policies WHERE id = ?",
                               (policy_id,)).fetchone())
    finally:
        db.close()


def policy_rows(api):
    return api.rows("SELECT * FROM access_policies ORDER BY id")


def config(api, token, headers=None):
    status, _, body = api.request("GET", "/api/v1/edge-nodes/me/config", headers=headers,
                                  auth=token)
    assert status == 200, body
    return body


def openssl_passwd(password, salt):
    require_tools("openssl")
    return subprocess.run(["openssl", "passwd", "-6", "-salt", salt, password],
                          capture_output=True, text=True, timeout=30, check=True).stdout.strip()


def libc_crypt(password, setting):
    """crypt(3) of libxcrypt, what nginx's auth_basic calls on an edge; None if it refuses."""
    name = ctypes.util.find_library("crypt")
    if name is None:
        pytest.skip("no libcrypt")
    library = ctypes.CDLL(name)
    library.crypt.restype = ctypes.c_char_p
    library.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    answer = library.crypt(password.encode(), setting.encode())
    return None if answer is None or answer.startswith(b"*") else answer.decode()


# SHA-512-crypt ################################################################################

@pytest.mark.parametrize("password, salt", [
    ("password", "saltsalt"),
    ("Hello world!", "saltstringsaltst"),
    ("pässwörd with ünïcode ✓", "ab./CD09"),
    ("x", "s"),
    ("a" * 63, "sixtythree"), ("b" * 64, "sixtyfour"), ("c" * 65, "sixtyfive"),
    ("long " * 51, "0123456789abcdef"),           # 255 bytes, as long as openssl reads
    ("quote ' \" $ ; { } \\ space", "rounds=1000$q"),
    ("rounds variant", "rounds=12345$abcdefgh"),
    ("clamped up", "rounds=10$abc"),
    ("salt cut to 16", "0123456789abcdefXYZ"),
])
def test_sha512_crypt_matches_openssl_passwd(password, salt):
    rounds = None
    setting = salt
    if salt.startswith("rounds="):
        text, _, salt = salt.partition("$")
        rounds = int(text.removeprefix("rounds="))
    assert kokoa.sha512_crypt(password, salt, rounds) == openssl_passwd(password, setting)


@pytest.mark.parametrize("length", [256, 300, 511])
def test_sha512_crypt_of_a_long_password_matches_the_edges_crypt(length):
    password = ("é" * length)[:length // 2] + "x" * (length - 2 * (length // 2))
    assert len(password.encode()) == length
    for salt, rounds, setting in (("abcdefgh", None, "$6$abcdefgh"),
                                  ("abcdefgh", 5000, "$6$rounds=5000$abcdefgh")):
        assert kokoa.sha512_crypt(password, salt, rounds) == libc_crypt(password, setting)


def test_the_edges_crypt_refuses_passwords_over_511_bytes_so_the_api_does_too(api):
    assert libc_crypt("x" * 511, "$6$abc") is not None
    assert libc_crypt("x" * 512, "$6$abc") is None
    long = "é" * 256                                     # 256 characters, 512 bytes
    create_policy(api, 400, users=[{"username": "alice", "password": long}])
    create_policy(api, users=[{"username": "alice", "password": "é" * 255 + "x"}])


def test_a_fresh_hash_has_a_random_16_character_salt_and_5000_rounds():
    first, second = kokoa.sha512_crypt(PASSWORD), kokoa.sha512_crypt(PASSWORD)
    assert first != second
    for made in (first, second):
        assert kokoa.SHA512_CRYPT_RE.fullmatch(made)
        _, kind, salt, _ = made.split("$")
        assert kind == "6" and len(salt) == 16
        assert made == kokoa.sha512_crypt(PASSWORD, salt)


# The API ######################################################################################

def test_a_policy_is_created_listed_read_changed_and_deleted(api):
    origin = api.create_origin()
    created = create_policy(
        api, users=[{"username": "bob", "password": PASSWORD},
                    {"username": "alice", "password_hash": KNOWN_HASH}],
        allow=["198.18.0.77", "198.18.0.0/24", "198.18.0.9/24", "2001:DB8::1/32"],
        deny=["198.18.0.66"], require="all", bypass_paths=["/api/", "/.well-known/x", "/api/"],
        forward_auth={"origin_id": origin["id"], "port": 9091, "path": "/api/authz/auth-request",
                      "signin_url": "HTTPS://Auth.Example.TEST/login?x=1"},
        pass_authorization=True)
    assert set(created) == {"id", "name", "users", "allow", "deny", "require", "bypass_paths",
                            "forward_auth", "pass_authorization", "routes", "created_at",
                            "updated_at"}
    assert created["users"] == ["alice", "bob"]
    assert created["allow"] == ["198.18.0.0/24", "198.18.0.77/32", "2001:db8::/32"]
    assert created["deny"] == ["198.18.0.66/32"]
    assert created["bypass_paths"] == ["/.well-known/x", "/api/"]
    assert created["forward_auth"] == {
        "origin_id": origin["id"], "port": 9091, "path": "/api/authz/auth-request",
        "signin_url": "https://auth.example.test/login?x=1"}
    assert (created["require"], created["pass_authorization"], created["routes"]) == (
        "all", True, [])
    path = f"/api/v1/access-policies/{created['id']}"
    assert api.request("GET", path)[2] == created
    listing = api.request("GET", "/api/v1/access-policies")[2]
    assert listing == {"access_policies": [created]}
    # Nothing reversible is stored, nothing secret is answered.
    row = stored_policy(api, created["id"])
    assert PASSWORD not in json.dumps(row)
    users = json.loads(row["users"])
    assert [user["username"] for user in users] == ["alice", "bob"]
    assert users[0]["hash"] == KNOWN_HASH
    for answer in (created, listing):
        assert KNOWN_HASH not in json.dumps(answer) and "$6$" not in json.dumps(answer)

    status, _, patched = api.request("PATCH", path, {"name": "Family ", "require": "any",
                                                     "forward_auth": None})
    assert status == 200, patched
    assert (patched["name"], patched["require"], patched["forward_auth"]) == (
        "Family", "any", None)
    assert patched["users"] == ["alice", "bob"] and patched["allow"] == created["allow"]
    assert api.request("DELETE", path)[0] == 204
    assert api.request("GET", path)[0] == 404
    assert api.request("DELETE", path)[0] == 404
    assert policy_rows(api) == []


def test_patch_keeps_the_hash_of_a_user_named_without_a_password(api):
    created = create_policy(api, users=[{"username": "alice", "password_hash": KNOWN_HASH},
                                        {"username": "bob", "password": PASSWORD}])
    bob_hash = json.loads(stored_policy(api, created["id"])["users"])[1]["hash"]
    path = f"/api/v1/access-policies/{created['id']}"
    status, _, patched = api.request("PATCH", path, {"users": [
        {"username": "bob"}, {"username": "carol", "password": "another long secret"}]})
    assert status == 200, patched
    assert patched["users"] == ["bob", "carol"]
    users = json.loads(stored_policy(api, created["id"])["users"])
    assert users[0] == {"username": "bob", "hash": bob_hash}
    assert kokoa.SHA512_CRYPT_RE.fullmatch(users[1]["hash"])
    # a new password replaces a stored one; a bare unknown name has none to keep
    status, _, patched = api.request("PATCH", path, {"users": [
        {"username": "bob", "password_hash": KNOWN_HASH}]})
    assert status == 200 and json.loads(stored_policy(api, created["id"])["users"]) == [
        {"username": "bob", "hash": KNOWN_HASH}]
    before = policy_rows(api)
    status, _, error = api.request("PATCH", path, {"users": [{"username": "dave"}]})
    assert status == 400 and error["error"]["field"] == "users"
    assert "dave" in error["error"]["message"] and policy_rows(api) == before
    # ... and neither has a new policy
    create_policy(api, 400, name="other", users=[{"username": "bob"}])


def test_a_stored_hash_verifies_with_openssl_passwd(api):
    created = create_policy(api)
    [user] = json.loads(stored_policy(api, created["id"])["users"])
    _, kind, salt, _ = user["hash"].split("$")
    assert kind == "6" and len(salt) == 16
    assert openssl_passwd(PASSWORD, salt) == user["hash"]
    assert openssl_passwd(PASSWORD + "x", salt) != user["hash"]


BAD_FIELDS = [
    # name
    ({"name": ""}, "name"), ({"name": "  "}, "name"), ({"name": "x" * 65}, "name"),
    ({"name": "a\nb"}, "name"), ({"name": 5}, "name"), ({"name": None}, "name"),
    # users
    ({"users": "alice"}, "users"), ({"users": [["alice", PASSWORD]]}, "users"),
    ({"users": [{"username": "nobody"}]}, "users"),
    ({"users": [{"username": "alice", "password": PASSWORD, "password_hash": KNOWN_HASH}]},
     "users"),
    ({"users": [{"username": "alice", "password": PASSWORD, "admin": True}]}, "users"),
    ({"users": [{"username": "alice", "password": PASSWORD}] * 2}, "users"),
    ({"users": [{"username": f"u{i}", "password_hash": KNOWN_HASH} for i in range(101)]},
     "users"),
    ({"users": [{"username": "alice", "password": "short"}]}, "users"),
    ({"users": [{"username": "alice", "password": "x" * 1025}]}, "users"),
    ({"users": [{"username": "alice", "password": "tab\tin password"}]}, "users"),
    ({"users": [{"username": "alice", "password": "newline\nin password"}]}, "users"),
    ({"users": [{"username": "alice", "password": "nul\x00in password"}]}, "users"),
    ({"users": [{"username": "alice", "password": 12345678}]}, "users"),
    ({"users": [{"username": "alice", "password_hash": None}]}, "users"),
    # hostile usernames
    *[({"users": [{"username": name, "password": PASSWORD}]}, "users") for name in (
        "", "a" * 65, "ali ce", "alice\n", "alice\nbob:$6$x", "al:ice", "al'ice", 'al"ice',
        "al;ice", "al{ice}", "al$ice", "alïce", "alice\u200b", "ali/ce", None, 7)],
    # hostile hashes
    *[({"users": [{"username": "alice", "password_hash": value}]}, "users") for value in (
        "", "plain", "$1$abc$" + "x" * 22, "$5$abc$" + "x" * 43, KNOWN_HASH[:-1],
        KNOWN_HASH + "x", KNOWN_HASH + "\n", KNOWN_HASH + "\nbob:" + KNOWN_HASH,
        KNOWN_HASH.replace("saltsalt", "salt salt"), KNOWN_HASH.replace("saltsalt", "salt;"),
        KNOWN_HASH.replace("saltsalt", "$salt"), KNOWN_HASH.replace("$6$", "$6$rounds=50$"),
        # a cost that would hold an edge's worker for seconds on every request
        KNOWN_HASH.replace("$6$", "$6$rounds=100001$"),
        KNOWN_HASH.replace("$6$", "$6$rounds=999999999$"), "$2b$13$" + "a" * 53,
        "$6$" + "s" * 17 + "$" + "x" * 86, "$2b$05$" + "a" * 52 + "\"",
        "$2b$99$" + "a" * 53, "$2a$05$" + "a" * 53, "$2y$05$" + "a" * 52 + "}",
        "$2y$05$" + "a" * 52 + "é")],
    # allow, deny
    *[({field: value}, field) for field in ("allow", "deny") for value in (
        "10.0.0.0/8", [10], [None], ["10.0.0.0/33"], ["10.0.0.0/8;"], ["10.0.0.0/8 deny"],
        ["10.0.0.0/8\n"], ["10.0.0.0/8}"], ["$remote_addr"], ["all"], ["'10.0.0.1'"],
        ["fe80::1%eth0"], ["fe80::1%eth0/64"], ["٣.1.1.1"], ["example.com"], ["1.2.3"],
        [f"10.0.{i // 256}.{i % 256}" for i in range(257)])],
    # require
    ({"require": "both"}, "require"), ({"require": None}, "require"), ({"require": 1}, "require"),
    # bypass_paths
    *[({"bypass_paths": value}, "bypass_paths") for value in (
        "/api/", [None], ["api/"], [""], ["/api//x"], ["//api"], ["/api/../admin"], ["/./api"],
        ["/.."], ["/api/."], ["/api;"], ["/api {"], ["/api\n"], ["/a b"], ["/$uri"], ["/'x'"],
        ['/"x"'], ["/%2e%2e/"], ["/ä"], ["/api?x=1"], ["/" + "a" * 201],
        [f"/p{i}" for i in range(33)])],
    # forward_auth
    *[({"forward_auth": value}, "forward_auth") for value in (
        "yes", [], {}, {"origin_id": "ORIGIN", "port": 9091},
        {"origin_id": "ORIGIN", "port": 9091, "path": "/auth", "extra": 1},
        {"origin_id": "8f0e1c1e-0000-4000-8000-000000000001", "port": 9091, "path": "/auth"},
        {"origin_id": None, "port": 9091, "path": "/auth"},
        {"origin_id": "ORIGIN", "port": 0, "path": "/auth"},
        {"origin_id": "ORIGIN", "port": 65536, "path": "/auth"},
        {"origin_id": "ORIGIN", "port": "9091", "path": "/auth"},
        {"origin_id": "ORIGIN", "port": True, "path": "/auth"},
        {"origin_id": "ORIGIN", "port": 9091, "path": "auth"},
        {"origin_id": "ORIGIN", "port": 9091, "path": "/auth;"},
        {"origin_id": "ORIGIN", "port": 9091, "path": "/a/../b"},
        *[{"origin_id": "ORIGIN", "port": 9091, "path": "/auth", "signin_url": url} for url in (
            "", "auth.example.com", "ftp://auth.example.com/", "javascript:alert(1)",
            "https://", "https://auth.example.com/ x", "https://auth.example.com/\n",
            "https://auth.example.com/';", "https://auth.example.com/\"", "https://auth.ex;ample/",
            "https://auth.example.com/{x}", "https://auth.example.com/$host",
            "https://user@auth.example.com/", "https://auth.example.com:99999/",
            "https://-bad-.example.com/", "https://auth..example.com/", "https://ä.example/",
            "https://[::1]/", "https://auth.example.com/#frag", "https://auth.example.com" +
            "/" + "a" * 500, 5)])],
    # pass_authorization
    ({"pass_authorization": "yes"}, "pass_authorization"),
    ({"pass_authorization": 1}, "pass_authorization"),
    ({"pass_authorization": None}, "pass_authorization"),
    # unknown fields, and a policy that protects nothing
    ({"id": "x"}, "id"), ({"routes": []}, "routes"), ({"password": PASSWORD}, "password"),
    ({"users": []}, "users"),
    ({"users": [], "bypass_paths": ["/api/"], "require": "all"}, "users"),
]


def with_origin(body, origin_id):
    """BAD_FIELDS entries name the real origin as ORIGIN."""
    return json.loads(json.dumps(body).replace('"ORIGIN"', json.dumps(origin_id)))


@pytest.mark.parametrize("fields, field", BAD_FIELDS, ids=range(len(BAD_FIELDS)))
def test_a_bad_field_is_a_400_naming_it_and_writes_nothing(api, fields, field):
    origin = api.create_origin()
    fields = with_origin(fields, origin["id"])
    good = {"name": "family", "users": [{"username": "alice", "password": PASSWORD}]}
    before = api.snapshot()
    status, _, error = api.request("POST", "/api/v1/access-policies", {**good, **fields})
    assert status == 400 and error["error"]["field"] == field, error
    assert error["error"]["code"] == "invalid_field"
    assert policy_rows(api) == [] and api.snapshot() == before
    # the same change to an existing policy changes nothing either
    created = create_policy(api)
    before = policy_rows(api)
    status, _, error = api.request("PATCH", f"/api/v1/access-policies/{created['id']}", fields)
    assert status == 400 and error["error"]["field"] == field, error
    assert policy_rows(api) == before


@pytest.mark.parametrize("body", [
    b"[]", b'"policy"', b"{", b'{"name": "a", "name": "b"}', b'{"users": NaN}'])
def test_a_body_that_is_not_a_policy_object_is_a_400(api, body):
    status, _, error = api.request("POST", "/api/v1/access-policies", body)
    assert status == 400 and error["error"]["code"] == "invalid_json"
    assert policy_rows(api) == []


@pytest.mark.parametrize("fields", [
    {"allow": ["198.18.0.0/24"]},
    {"deny": ["198.18.0.66"]},
    {"forward_auth": {"origin_id": "ORIGIN", "port": 4180, "path": "/oauth2/auth"}},
    {"users": [{"username": "a.b_c@d-e", "password_hash": BCRYPT_HASH}]},
    {"users": [{"username": "x" * 64, "password_hash": KNOWN_HASH.replace(
        "$6$", "$6$rounds=100000$")}]},
])
def test_any_one_protection_makes_a_policy(api, fields):
    origin = api.create_origin()
    body = {"name": "one", **with_origin(fields, origin["id"])}
    status, _, created = api.request("POST", "/api/v1/access-policies", body)
    assert status == 201, created
    assert created["require"] == "any" and created["pass_authorization"] is False
    # and taking the last one away is refused
    empty = {field: None if field == "forward_auth" else [] for field in fields}
    status, _, error = api.request("PATCH", f"/api/v1/access-policies/{created['id']}", empty)
    assert status == 400 and error["error"]["field"] == "users"


def test_names_are_unique_ignoring_case(api):
    create_policy(api, name="Family")
    before = policy_rows(api)
    status, _, error = api.request("POST", "/api/v1/access-policies", {
        "name": "FAMILY", "allow": ["10.0.0.0/8"]})
    assert status == 409 and error["error"]["field"] == "name"
    other = create_policy(api, name="friends")
    status, _, error = api.request("PATCH", f"/api/v1/access-policies/{other['id']}",
                                   {"name": "family"})
    assert status == 409 and error["error"]["field"] == "name"
    assert len(policy_rows(api)) == len(before) + 1


@pytest.mark.parametrize("path", ["/api/v1/access-policies/nope",
                                  "/api/v1/access-policies/8f0e1c1e-0000-4000-8000-000000000001"])
def test_an_unknown_policy_is_a_404(api, path):
    for method, body in (("GET", None), ("PATCH", {"require": "all"}), ("DELETE", None)):
        status, _, error = api.request(method, path, body)
        assert status == 404 and error["error"]["code"] == "not_found", (method, error)


def test_the_policy_api_is_for_the_admin_only(api):
    _, token = api.register_edge("edge1")
    for auth in (None, token):
        status, _, _ = api.request("GET", "/api/v1/access-policies", auth=auth)
        assert status == 401
        status, _, _ = api.request("POST", "/api/v1/access-policies", {
            "name": "x", "allow": ["10.0.0.0/8"]}, auth=auth)
        assert status == 401
    assert policy_rows(api) == []


# Routes and origins that policies use #########################################################

def test_a_route_takes_a_policy_and_a_policy_in_use_is_not_deleted(api):
    origin = api.create_origin()
    policy = create_policy(api)
    status, _, route = api.request("POST", "/api/v1/routes", {
        "hostname": "nas.example.com", "origin_id": origin["id"], "target_port": 5000,
        "access_policy_id": policy["id"]})
    assert status == 201, route
    assert (route["access_policy_id"], route["access_policy_name"]) == (policy["id"], "family")
    public = api.create_route("www.example.com", origin["id"])
    assert (public["access_policy_id"], public["access_policy_name"]) == (None, None)
    assert api.request("PATCH", f"/api/v1/routes/{public['id']}", {
        "access_policy_id": policy["id"]})[0] == 200
    path = f"/api/v1/access-policies/{policy['id']}"
    assert api.request("GET", path)[2]["routes"] == ["nas.example.com", "www.example.com"]

    status, _, error = api.request("DELETE", path)
    assert status == 409 and error["error"]["code"] == "in_use"
    assert "nas.example.com" in error["error"]["message"]
    assert "www.example.com" in error["error"]["message"]
    assert len(policy_rows(api)) == 1
    # back to public, then it goes
    for route_id in (route["id"], public["id"]):
        status, _, patched = api.request("PATCH", f"/api/v1/routes/{route_id}",
                                         {"access_policy_id": None})
        assert status == 200 and patched["access_policy_id"] is None
    assert api.request("DELETE", path)[0] == 204


@pytest.mark.parametrize("value", [
    "8f0e1c1e-0000-4000-8000-000000000001", "nope", 5, True, "", {"id": "x"}])
def test_an_unknown_policy_for_a_route_is_a_400_naming_access_policy_id(api, value):
    origin = api.create_origin()
    route = api.create_route("a.example.com", origin["id"])
    before = api.snapshot()
    status, _, error = api.request("POST", "/api/v1/routes", {
        "hostname": "b.example.com", "origin_id": origin["id"], "target_port": 80,
        "access_policy_id": value})
    assert status == 400 and error["error"]["field"] == "access_policy_id", error
    status, _, error = api.request("PATCH", f"/api/v1/routes/{route['id']}",
                                   {"access_policy_id": value, "target_port": 81})
    assert status == 400 and error["error"]["field"] == "access_policy_id", error
    assert api.snapshot() == before


def test_an_origin_running_a_policys_verifier_is_not_deleted(api):
    verifier = api.create_origin("authelia", "10.8.0.5")
    policy = create_policy(api, name="sso", users=[], forward_auth={
        "origin_id": verifier["id"], "port": 9091, "path": "/api/authz/auth-request"})
    status, _, error = api.request("DELETE", f"/api/v1/origins/{verifier['id']}")
    assert status == 409 and "sso" in error["error"]["message"], error
    assert api.request("GET", f"/api/v1/origins/{verifier['id']}")[0] == 200
    assert api.request("PATCH", f"/api/v1/access-policies/{policy['id']}", {
        "forward_auth": None, "allow": ["10.0.0.0/8"]})[0] == 200
    assert api.request("DELETE", f"/api/v1/origins/{verifier['id']}")[0] == 204


# The payload ##################################################################################

def protected_world(api):
    """An origin, a verifier, a policy with every kind of protection, three routes using it
    (one disabled), one public route and an edge; returns (policy, token)."""
    origin = api.create_origin()
    verifier = api.create_origin("authelia", "fd00:8::5")
    policy = create_policy(
        api, users=[{"username": "bob", "password_hash": BCRYPT_HASH},
                    {"username": "alice", "password_hash": KNOWN_HASH}],
        allow=["198.18.0.0/24"], deny=["198.18.0.66/32"], bypass_paths=["/api/"],
        forward_auth={"origin_id": verifier["id"], "port": 9091,
                      "path": "/api/authz/auth-request",
                      "signin_url": "https://auth.example.test/"})
    for hostname, enabled in (("nas.example.com", True), ("ha.example.com", True),
                              ("off.example.com", False)):
        status, _, body = api.request("POST", "/api/v1/routes", {
            "hostname": hostname, "origin_id": origin["id"], "target_port": 5000,
            "access_policy_id": policy["id"], "enabled": enabled})
        assert status == 201, body
    api.create_route("www.example.com", origin["id"])
    _, token = api.register_edge("edge1")
    return policy, token


EXPECTED_POLICY = {
    "users": [{"username": "alice", "hash": KNOWN_HASH}, {"username": "bob", "hash": BCRYPT_HASH}],
    "allow": ["198.18.0.0/24"], "deny": ["198.18.0.66/32"], "require": "any",
    "bypass_paths": ["/api/"],
    "forward_auth": {"upstream": "[fd00:8::5]:9091", "path": "/api/authz/auth-request",
                     "signin_url": "https://auth.example.test/"},
    "pass_authorization": False}


def test_schema_2_carries_each_served_policy_once_under_its_key(api):
    policy, token = protected_world(api)
    payload = config(api, token, AGENT_HEADER)
    key = kokoa.sha256_hex(kokoa.canonical_json(EXPECTED_POLICY))[:16]
    assert payload["access"] == {key: EXPECTED_POLICY}
    assert set(payload) == {"schema", "hostnames", "routes", "access", "acme", "nginx_map",
                            "wireguard", "config_hash"}
    assert payload["hostnames"] == ["ha.example.com", "nas.example.com", "www.example.com"]
    for hostname in ("ha.example.com", "nas.example.com"):
        assert payload["routes"][hostname] == {
            "upstream": "10.8.0.2:5000", "max_body_size": 0, "buffering": True, "hsts": True,
            "access": key}
    assert payload["routes"]["www.example.com"]["access"] is None
    assert set(payload["routes"]["www.example.com"]) == {
        "upstream", "max_body_size", "buffering", "hsts", "access"}
    # no id, no name, no timestamp in it
    text = json.dumps(payload)
    for value in (policy["id"], policy["name"], policy["created_at"]):
        assert value not in text
    # A policy of no served route is not sent.
    for route in api.request("GET", "/api/v1/routes")[2]["routes"]:
        if route["access_policy_id"]:
            api.request("PATCH", f"/api/v1/routes/{route['id']}", {"access_policy_id": None})
    assert config(api, token, AGENT_HEADER)["access"] == {}


def test_a_change_to_a_policy_changes_the_payload_and_its_key(api):
    policy, token = protected_world(api)
    first = config(api, token, AGENT_HEADER)
    status, _, _ = api.request("PATCH", f"/api/v1/access-policies/{policy['id']}",
                               {"require": "all"})
    assert status == 200
    second = config(api, token, AGENT_HEADER)
    assert second["config_hash"] != first["config_hash"]
    [key] = second["access"]
    assert key == kokoa.policy_key({**EXPECTED_POLICY, "require": "all"}) != next(
        iter(first["access"]))
    assert second["routes"]["nas.example.com"]["access"] == key
    # a rename alone changes nothing an edge sees
    api.request("PATCH", f"/api/v1/access-policies/{policy['id']}", {"name": "renamed"})
    assert config(api, token, AGENT_HEADER)["config_hash"] == second["config_hash"]


def test_schema_1_leaves_a_protected_route_out_and_the_edge_list_says_why(api):
    _, token = protected_world(api)
    payload = config(api, token)
    assert "access" not in payload and "schema" not in payload
    assert payload["hostnames"] == ["www.example.com"]
    assert payload["routes"] == {"www.example.com": "10.8.0.2:8080"}
    assert "nas.example.com" not in payload["nginx_map"]
    [edge] = api.request("GET", "/api/v1/edge-nodes")[2]["edge_nodes"]
    assert edge["schema"] == 1
    assert edge["unserved_routes"] == [
        {"hostname": host, "reason": "needs access, which schema 1 agents cannot enforce: "
                                     "upgrade the edge's agent"}
        for host in ("ha.example.com", "nas.example.com")]


def test_schema_1_bytes_of_public_routes_do_not_change_with_policies_around(api):
    origin = api.create_origin()
    api.create_route("www.example.com", origin["id"])
    _, token = api.register_edge("edge1")
    status, _, before = api.request("GET", "/api/v1/edge-nodes/me/config", auth=token)
    create_policy(api)          # a policy no route uses
    status, _, after = api.request("GET", "/api/v1/edge-nodes/me/config", auth=token)
    assert status == 200 and after == before


# Restore ######################################################################################

def policy_backup(tmp_path, *statements):
    """A real backup of a control plane with a protected route, then edited by hand."""
    db_path = str(tmp_path / "live.db")
    server = InProcessServer(make_config(db_path))
    try:
        verifier = server.create_origin()
        policy = create_policy(server, bypass_paths=["/api/"], forward_auth={
            "origin_id": verifier["id"], "port": 9091, "path": "/auth",
            "signin_url": "https://auth.example.test/"})
        status, _, body = server.request("POST", "/api/v1/routes", {
            "hostname": "nas.example.com", "origin_id": verifier["id"], "target_port": 80,
            "access_policy_id": policy["id"]})
        assert status == 201, body
    finally:
        server.close()
    return db_path, edited_backup(db_path, tmp_path / "crafted.db", *statements)


def sql_text(value):
    """An SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def set_users(*users):
    """An UPDATE giving the policy these stored users (dicts, as crafted)."""
    return f"UPDATE access_policies SET users = {sql_text(json.dumps(list(users)))}"


def set_column(column, value):
    return f"UPDATE access_policies SET {column} = {sql_text(value)}"


CRAFTED = [
    (set_users({"username": "alice\nbob", "hash": KNOWN_HASH}), "users"),
    (set_users({"username": "alice", "hash": KNOWN_HASH + "\nbob:x"}), "users"),
    (set_users({"username": "alice", "hash": "plain"}), "users"),
    (set_users({"username": "alice", "hash": KNOWN_HASH, "password": PASSWORD}), "users"),
    (set_users({"username": "b", "hash": KNOWN_HASH}, {"username": "a", "hash": KNOWN_HASH}),
     "users"),
    (set_users({"username": "a", "hash": KNOWN_HASH}, {"username": "a", "hash": KNOWN_HASH}),
     "users"),
    (set_users("alice"), "users"),
    (set_column("users", "{}"), "users"),
    (set_column("users", "not json"), "JSON"),
    (set_column("allow", '["10.0.0.0/8; allow all"]'), "allow"),
    (set_column("deny", '["10.0.0.1/8"]'), "deny"),
    (set_column("allow", '["10.0.0.0/8", "10.0.0.0/8"]'), "allow"),
    (set_column("bypass_paths", '["/api/ { return 200; }"]'), "bypass_paths"),
    (set_column("bypass_paths", '["/api/../admin"]'), "bypass_paths"),
    (set_column("forward_path", "/auth;"), "forward_path"),
    (set_column("forward_signin_url", 'https://a.example/"; return 200'), "forward_auth"),
    (set_column("forward_signin_url", "HTTPS://A.example/"), "forward_signin_url"),
    ("UPDATE access_policies SET name = 'family' || char(10) || 'x'", "name"),
    (set_column("name_key", "other"), "name_key"),
    ("UPDATE access_policies SET users = '[]', forward_origin_id = NULL, forward_port = NULL, "
     "forward_path = NULL, forward_signin_url = NULL", "protect nothing"),
    ("UPDATE routes SET access_policy_id = '8f0e1c1e-0000-4000-8000-00000000000f'",
     "refers to a missing access_policies row"),
    ("UPDATE routes SET access_policy_id = 'not an id'", "access_policy_id"),
    ("CREATE TRIGGER t AFTER UPDATE ON access_policies BEGIN SELECT 1; END", "extra trigger t"),
]


@pytest.mark.parametrize("statement, named", CRAFTED, ids=range(len(CRAFTED)))
def test_restore_refuses_a_backup_with_a_policy_row_the_api_would_refuse(tmp_path, statement,
                                                                          named):
    db_path, backup = policy_backup(tmp_path, statement)
    before = Path(db_path).read_bytes()
    result = run_cli("restore", str(backup), "--db", db_path, "--force", cwd=tmp_path)
    assert result.returncode == 2 and named in result.stderr, result.stderr
    assert "nothing was restored" in result.stderr
    assert PASSWORD not in result.stderr
    assert Path(db_path).read_bytes() == before


def test_an_untouched_backup_with_policies_restores(tmp_path):
    db_path, backup = policy_backup(tmp_path)
    result = run_cli("restore", str(backup), "--db", db_path, "--force", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_the_migration_adds_the_table_and_column_and_keeps_older_rows(tmp_path):
    db = kokoa.connect(str(tmp_path / "old.db"))
    try:
        kokoa.migrate(db, kokoa.MIGRATIONS[:-1])
        db.execute("INSERT INTO origins (id, name, name_key, wg_ip, wg_public_key) VALUES "
                   "('8f0e1c1e-0000-4000-8000-000000000001', 'o', 'o', '10.8.0.2', ?)",
                   ("A" * 43 + "=",))
        db.execute("INSERT INTO routes (id, hostname, origin_id, target_port) VALUES "
                   "('8f0e1c1e-0000-4000-8000-000000000002', 'a.example.com', "
                   "'8f0e1c1e-0000-4000-8000-000000000001', 80)")
        assert kokoa.migrate(db) == len(kokoa.MIGRATIONS)
        assert db.execute("SELECT access_policy_id FROM routes").fetchone()[0] is None
        assert db.execute("SELECT count(*) FROM access_policies").fetchone()[0] == 0
        assert kokoa.unexpected_schema(db, len(kokoa.MIGRATIONS)) == []
        assert list(db.execute("PRAGMA foreign_key_check")) == []
    finally:
        db.close()
