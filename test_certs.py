"""Certificates shared by the fleet (issue 15): claims, uploads, downloads, HTTP-01 tokens, the
back-off, wildcard routes and schema 3 — against a real control plane in this process (real
SQLite, waitress, cryptography). The issuance itself (certbot, pebble, two edges) is in
test_fleet.py."""

import datetime
import json
import sqlite3
import time

import pytest

import kokoa
from conftest import (
    InProcessServer,
    edited_backup,
    make_certificate,
    make_config,
    require_tools,
    wait_until,
)
from netlab import Knot

AGENT_HEADER = {"X-Kokoa-Agent": f"{kokoa.__version__}; schema=1,2,3"}
TOKEN = "Tq3mZ8yVbN1cXr5wKp0aLs7dHf2gJe9u_-AbCdEfGhI"        # 43 base64url characters
THUMBPRINT = "9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


@pytest.fixture
def fleet(tmp_path):
    """A control plane with one route (a.example.com) and two edges: (server, tokens)."""
    config = make_config(tmp_path / "kokoa.db", cert_claim_seconds=900,
                         cert_backoff_seconds=300)
    server = InProcessServer(config)
    origin = server.create_origin()
    server.create_route("a.example.com", origin["id"])
    server.origin = origin
    tokens = {name: server.register_edge(name)[1] for name in ("edge1", "edge2")}
    yield server, tokens
    server.close()


def edge_call(server, token, method, path, body=None, headers=None):
    return server.request(method, "/api/v1/edge-nodes/me" + path, body,
                          headers={**AGENT_HEADER, **(headers or {})}, auth=token)


def claim(server, token, name="a.example.com"):
    return edge_call(server, token, "POST", f"/certificates/{name}/claim", {})


def upload(server, token, body, name="a.example.com"):
    return edge_call(server, token, "PUT", f"/certificates/{name}", body)


def test_one_edge_claims_uploads_and_every_edge_downloads_the_same_certificate(fleet):
    server, tokens = fleet
    status, _, granted = claim(server, tokens["edge1"])
    assert status == 200 and granted["name"] == "a.example.com" and granted["until"]
    status, _, refused = claim(server, tokens["edge2"])
    assert status == 409
    assert refused["holder"] == "edge1" and refused["until"] == granted["until"]
    fullchain, privkey = make_certificate(["a.example.com"])
    status, _, body = upload(server, tokens["edge2"], {"fullchain": fullchain, "privkey": privkey})
    assert status == 409 and body["error"]["field"] == "name"       # not the claim holder
    assert upload(server, tokens["edge1"], {"fullchain": fullchain, "privkey": privkey})[0] == 204

    answers = [edge_call(server, tokens[name], "GET", "/certificates") for name in tokens]
    (s1, h1, b1), (s2, h2, b2) = answers
    assert s1 == s2 == 200 and b1 == b2 and h1["ETag"] == h2["ETag"]
    served = b1["certificates"]["a.example.com"]
    assert served["fullchain"] == fullchain
    assert served["privkey"].startswith("-----BEGIN PRIVATE KEY-----")
    assert served["not_after"] and served["renew_after"] < served["not_after"]
    status, _, empty = edge_call(server, tokens["edge2"], "GET", "/certificates",
                                 headers={"If-None-Match": h1["ETag"]})
    assert status == 304 and empty == b""
    # A valid certificate that is not due is not issued again, by anyone.
    status, _, refused = claim(server, tokens["edge2"])
    assert status == 409 and refused["renew_after"] == served["renew_after"]

    [listed] = server.request("GET", "/api/v1/certificates")[2]["certificates"]
    assert listed["name"] == "a.example.com" and listed["state"] == "valid"
    assert listed["issuer_edge_name"] == "edge1" and listed["claim"] is None
    assert listed["wildcard"] is False and listed["last_error"] is None
    assert "privkey" not in json.dumps(listed) and "PRIVATE" not in json.dumps(listed)
    stored = server.rows("SELECT privkey_enc FROM certificates")[0][0]
    assert b"PRIVATE KEY" not in stored and privkey.encode()[40:80] not in stored


def _certificate_of(names, **kwargs):
    """A change that gives the upload another certificate and its key."""
    def change(body):
        body["fullchain"], body["privkey"] = make_certificate(names, **kwargs)
    return change


def _wrong_key(body):
    body["privkey"] = make_certificate(["a.example.com"])[1]


def _expired(body):
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=100)
    _certificate_of(["a.example.com"], days=10, not_before=past)(body)


@pytest.mark.parametrize("case, change, field, fragment", [
    ("key not matching", _wrong_key, "privkey", "does not match"),
    ("wrong names", _certificate_of(["evil.example.com"]), "fullchain",
     "does not name a.example.com"),
    ("wildcard of the name", _certificate_of(["*.example.com"]), "fullchain",
     "does not name a.example.com"),
    ("expired", _expired, "fullchain", "expired"),
    ("oversized", lambda b: b.update(fullchain=b["fullchain"] + "x" * 70000), "fullchain",
     "under 64 KiB"),
    ("malformed PEM", lambda b: b.update(fullchain="-----BEGIN CERTIFICATE-----\nnope\n"),
     "fullchain", "not a PEM certificate chain"),
    ("not a string", lambda b: b.update(fullchain=["x"]), "fullchain", "PEM text"),
    ("malformed key", lambda b: b.update(privkey="-----BEGIN PRIVATE KEY-----\nAAAA\n"),
     "privkey", "not an unencrypted PEM private key"),
    ("non-ASCII", lambda b: b.update(privkey=b["privkey"] + "é"), "privkey", "ASCII"),
    ("unknown field", lambda b: b.update(chain="x"), "chain", "unknown field"),
    ("missing key", lambda b: b.pop("privkey"), "privkey", "required"),
])
def test_a_forged_or_broken_upload_is_refused_naming_the_field(fleet, case, change, field,
                                                                fragment):
    server, tokens = fleet
    assert claim(server, tokens["edge1"])[0] == 200
    fullchain, privkey = make_certificate(["a.example.com"])
    body = {"fullchain": fullchain, "privkey": privkey}
    change(body)
    status, _, answer = upload(server, tokens["edge1"], body)
    assert status == 400, answer
    assert answer["error"]["field"] == field and fragment in answer["error"]["message"]
    assert server.rows("SELECT fullchain FROM certificates") == [(None,)]


@pytest.mark.parametrize("name", ["evil.example.com", "A.example.com", "..", "a.example.com.",
                                  "*.example.com", "%2e%2e", "a.example.com%00"])
def test_a_name_that_is_not_one_of_the_fleets_hostnames_is_refused(fleet, name):
    server, tokens = fleet
    for method, path, body in (("POST", f"/certificates/{name}/claim", {}),
                               ("PUT", f"/certificates/{name}", {"fullchain": "", "privkey": ""}),
                               ("POST", f"/certificates/{name}/failure", {"error": "x"})):
        status, _, answer = edge_call(server, tokens["edge1"], method, path, body)
        assert status in (403, 404), (method, path, answer)
        if status == 403:
            assert answer["error"]["field"] == "name"
    assert server.rows("SELECT name FROM certificates") == []


def test_an_admin_never_opens_an_edge_endpoint_nor_an_edge_the_admin_list(fleet):
    server, tokens = fleet
    assert server.request("POST", "/api/v1/edge-nodes/me/certificates/a.example.com/claim",
                          {}, headers=AGENT_HEADER)[0] == 401
    assert server.request("GET", "/api/v1/certificates", auth=tokens["edge1"])[0] == 401


def test_a_failed_attempt_backs_off_the_whole_fleet_and_says_why_in_words(fleet):
    server, tokens = fleet
    assert claim(server, tokens["edge1"])[0] == 200
    error = ("Detail: 198.18.0.2: Fetching http://a.example.com/.well-known/acme-challenge/x: "
             "Connection refused")
    status, _, body = edge_call(server, tokens["edge2"], "POST",
                                "/certificates/a.example.com/failure", {"error": error})
    assert status == 409 and body["error"]["field"] == "name"      # only the holder reports
    assert edge_call(server, tokens["edge1"], "POST", "/certificates/a.example.com/failure",
                     {"error": error})[0] == 204
    for token in tokens.values():
        status, _, refused = claim(server, token)
        assert status == 409 and refused["next_attempt_at"]
        assert "Connection refused" in refused["error"]["message"]
    [listed] = server.request("GET", "/api/v1/certificates")[2]["certificates"]
    assert listed["state"] == "failed" and listed["failures"] == 1
    assert listed["last_error"].startswith(error)
    assert "is port 80 open on every edge" in listed["last_error"]
    waits = []
    for failures in (1, 2, 3, 10):
        server.rows("UPDATE certificates SET next_attempt_at = NULL, failures = ?",
                    (failures - 1,))
        assert claim(server, tokens["edge1"])[0] == 200
        before = time.time()
        edge_call(server, tokens["edge1"], "POST", "/certificates/a.example.com/failure",
                  {"error": "boom"})
        [(next_at,)] = server.rows("SELECT next_attempt_at FROM certificates")
        waits.append(round((kokoa.parse_iso_time(next_at) - before) / 60))
    assert waits == [5, 10, 20, 360]            # doubling from 5 min, capped at 6 h


@pytest.mark.parametrize("body, field", [
    ({}, "error"), ({"error": 5}, "error"), ({"error": "x" * 3000}, "error"),
    ({"error": "x", "more": 1}, "more"),
])
def test_a_malformed_failure_report_is_a_400_naming_the_field(fleet, body, field):
    server, tokens = fleet
    claim(server, tokens["edge1"])
    status, _, answer = edge_call(server, tokens["edge1"], "POST",
                                  "/certificates/a.example.com/failure", body)
    assert status == 400 and answer["error"]["field"] == field


def test_an_expired_claim_lets_another_edge_take_over(tmp_path):
    server = InProcessServer(make_config(tmp_path / "kokoa.db", cert_claim_seconds=1))
    try:
        origin = server.create_origin()
        server.create_route("a.example.com", origin["id"])
        first, second = (server.register_edge(name)[1] for name in ("edge1", "edge2"))
        assert claim(server, first)[0] == 200
        assert claim(server, second)[0] == 409
        wait_until(lambda: claim(server, second)[0] == 200, timeout=10, interval=0.2,
                   what="the claim to expire")
        fullchain, privkey = make_certificate(["a.example.com"])
        status, _, body = upload(server, first, {"fullchain": fullchain, "privkey": privkey})
        assert status == 409 and body["error"]["field"] == "name"    # too late: edge2's now
        assert upload(server, second, {"fullchain": fullchain, "privkey": privkey})[0] == 204
    finally:
        server.close()


def test_renewal_is_claimed_once_the_certificate_is_due(tmp_path):
    config = make_config(tmp_path / "kokoa.db", cert_renew_before=89 * 86400)
    server = InProcessServer(config)
    try:
        origin = server.create_origin()
        server.create_route("a.example.com", origin["id"])
        first, second = (server.register_edge(name)[1] for name in ("edge1", "edge2"))
        assert claim(server, first)[0] == 200
        fullchain, privkey = make_certificate(["a.example.com"], days=90)
        assert upload(server, first, {"fullchain": fullchain, "privkey": privkey})[0] == 204
        [listed] = server.request("GET", "/api/v1/certificates")[2]["certificates"]
        assert listed["state"] == "expiring"
        assert claim(server, second)[0] == 200        # due: one edge renews ...
        assert claim(server, first)[0] == 409         # ... and only one
    finally:
        server.close()


def test_rotate_key_reseals_certificate_keys_and_restore_checks_their_rows(fleet, tmp_path):
    server, tokens = fleet
    claim(server, tokens["edge1"])
    fullchain, privkey = make_certificate(["a.example.com"])
    assert upload(server, tokens["edge1"], {"fullchain": fullchain, "privkey": privkey})[0] == 204
    old = server.config.keyring
    new = kokoa.Keyring(bytes(range(32)), [old.current])
    db = kokoa.connect(server.config.db_path)
    try:
        assert kokoa.rotate_secrets(db, new) == 2        # the origin's key and the certificate's
        [row] = db.execute("SELECT * FROM certificates").fetchall()
        assert new.is_current(row["privkey_enc"])
        aad = kokoa.secret_aad("certificates", "a.example.com", "privkey")
        assert new.unseal(row["privkey_enc"], aad).decode() == privkey
        assert kokoa.stored_row_problems(db, None) == []
    finally:
        db.close()
    other = make_certificate(["b.example.com"])[0]
    for statement, fragment in (
            ("UPDATE certificates SET name = 'A.example.com'", "name is not in the form"),
            (f"UPDATE certificates SET fullchain = '{other}'", "does not name"),
            ("UPDATE certificates SET privkey_enc = x'00'", "privkey_enc"),
            ("UPDATE certificates SET claim_edge_id = 'x'", "claim_edge_id")):
        crafted = edited_backup(server.config.db_path, tmp_path / "crafted.db", statement)
        source = sqlite3.connect(crafted)
        source.row_factory = sqlite3.Row
        try:
            problems = kokoa.stored_row_problems(source, None)
        finally:
            source.close()
        crafted.unlink()
        assert any(fragment in problem for problem in problems), (statement, problems)


def test_an_http01_token_is_served_publicly_while_it_lives(fleet):
    server, tokens = fleet
    key_authorization = f"{TOKEN}.{THUMBPRINT}"
    path = f"/acme-challenges/{TOKEN}"
    assert edge_call(server, tokens["edge1"], "PUT", path,
                     {"key_authorization": key_authorization})[0] == 204
    status, headers, body = server.request("GET", f"/.well-known/acme-challenge/{TOKEN}",
                                           auth=None)
    assert status == 200 and body == key_authorization.encode()
    assert headers["Content-Type"] == "text/plain"
    status, _, answer = edge_call(server, tokens["edge2"], "PUT", path,
                                  {"key_authorization": key_authorization})
    assert status == 409 and answer["error"]["field"] == "token"
    assert edge_call(server, tokens["edge2"], "DELETE", path)[0] == 404     # not its own
    assert edge_call(server, tokens["edge1"], "DELETE", path)[0] == 204
    assert server.request("GET", f"/.well-known/acme-challenge/{TOKEN}", auth=None)[0] == 404
    assert server.request("GET", "/.well-known/acme-challenge/unknown-token-0123456789",
                          auth=None)[0] == 404


def test_an_http01_token_expires_after_its_lifetime(fleet):
    server, tokens = fleet
    server.app.acme_challenges.lifetime = 0.5
    edge_call(server, tokens["edge1"], "PUT", f"/acme-challenges/{TOKEN}",
              {"key_authorization": f"{TOKEN}.{THUMBPRINT}"})
    wait_until(lambda: server.request("GET", f"/.well-known/acme-challenge/{TOKEN}",
                                      auth=None)[0] == 404, timeout=5, what="the token to expire")


@pytest.mark.parametrize("token, body, field", [
    ("short", {"key_authorization": "short." + THUMBPRINT}, "token"),
    ("a" * 129, {"key_authorization": "a" * 129 + "." + THUMBPRINT}, "token"),
    (TOKEN[:20] + "%3B" + TOKEN[20:], {"key_authorization": "x"}, "token"),
    (TOKEN[:20] + "..", {"key_authorization": "x"}, "token"),
    (TOKEN, {"key_authorization": f"{TOKEN}x.{THUMBPRINT}"}, "key_authorization"),
    (TOKEN, {"key_authorization": TOKEN}, "key_authorization"),
    (TOKEN, {"key_authorization": f"{TOKEN}.{THUMBPRINT};\nreturn 200"}, "key_authorization"),
    (TOKEN, {"key_authorization": f"{TOKEN}." + "a" * 400}, "key_authorization"),
    (TOKEN, {"key_authorization": 7}, "key_authorization"),
    (TOKEN, {}, "key_authorization"),
    (TOKEN, {"key_authorization": f"{TOKEN}.{THUMBPRINT}", "x": 1}, "x"),
])
def test_a_malformed_http01_challenge_is_a_400_naming_the_field(fleet, token, body, field):
    server, tokens = fleet
    status, _, answer = edge_call(server, tokens["edge1"], "PUT", f"/acme-challenges/{token}",
                                  body)
    assert status == 400 and answer["error"]["field"] == field, answer


def test_an_edge_may_publish_only_a_bounded_number_of_tokens(fleet):
    server, tokens = fleet
    for i in range(kokoa.ACME_CHALLENGES_PER_EDGE):
        token = f"{TOKEN[:40]}{i:03d}"
        assert edge_call(server, tokens["edge1"], "PUT", f"/acme-challenges/{token}",
                         {"key_authorization": f"{token}.{THUMBPRINT}"})[0] == 204
    token = TOKEN[:40] + "zzz"
    status, headers, answer = edge_call(server, tokens["edge1"], "PUT",
                                        f"/acme-challenges/{token}",
                                        {"key_authorization": f"{token}.{THUMBPRINT}"})
    assert status == 429 and answer["error"]["field"] == "token" and headers["Retry-After"]
    assert edge_call(server, tokens["edge2"], "PUT", f"/acme-challenges/{token}",
                     {"key_authorization": f"{token}.{THUMBPRINT}"})[0] == 204


def test_a_wildcard_route_needs_a_dns_provider(fleet):
    server, _ = fleet
    status, _, body = server.request("POST", "/api/v1/routes", {
        "hostname": "*.example.com", "origin_id": server.origin["id"], "target_port": 8080})
    assert status == 400 and body["error"]["field"] == "hostname"
    assert "no DNS provider is configured" in body["error"]["message"]
    route_id = server.request("GET", "/api/v1/routes")[2]["routes"][0]["id"]
    status, _, body = server.request("PATCH", f"/api/v1/routes/{route_id}",
                                     {"hostname": "*.example.com"})
    assert status == 400 and body["error"]["field"] == "hostname"


@pytest.mark.parametrize("hostname", ["*.com", "a.*.example.com", "**.example.com", "*",
                                      "*example.com", "*.*.example.com", "x*.example.com"])
def test_a_malformed_wildcard_is_a_400_naming_hostname(tmp_path, hostname):
    config = make_config(tmp_path / "kokoa.db", dns_settings={
        "KOKOA_DNS_PROVIDER": "rfc2136", "KOKOA_DNS_ZONE": "example.com"})
    server = InProcessServer(config)
    try:
        origin = server.create_origin()
        status, _, body = server.request("POST", "/api/v1/routes", {
            "hostname": hostname, "origin_id": origin["id"], "target_port": 8080})
        assert status == 400 and body["error"]["field"] == "hostname", body
    finally:
        server.close()


def test_schema_3_serves_wildcards_and_older_schemas_leave_them_out(tmp_path):
    config = make_config(tmp_path / "kokoa.db", dns_settings={
        "KOKOA_DNS_PROVIDER": "rfc2136", "KOKOA_DNS_ZONE": "example.com"})
    server = InProcessServer(config)
    try:
        origin = server.create_origin()
        server.create_route("*.example.com", origin["id"], 8080)
        server.create_route("a.example.com", origin["id"], 8081)
        _, token = server.register_edge("edge1")
        payloads = {}
        for schemas in ("1", "1,2", "1,2,3"):
            status, _, payload = server.request(
                "GET", "/api/v1/edge-nodes/me/config", auth=token,
                headers={"X-Kokoa-Agent": f"{kokoa.__version__}; schema={schemas}"})
            assert status == 200
            payloads[schemas[-1]] = payload
        for schema in ("1", "2"):
            assert payloads[schema]["hostnames"] == ["a.example.com"]
            assert "hostnames;" not in payloads[schema]["nginx_map"]
        assert payloads["3"]["schema"] == 3
        assert payloads["3"]["hostnames"] == ["*.example.com", "a.example.com"]
        assert "    hostnames;\n" in payloads["3"]["nginx_map"]
        assert "    *.example.com kokoa_v4_10_8_0_2_8080;" in payloads["3"]["nginx_map"]
        [edge] = server.request("GET", "/api/v1/edge-nodes")[2]["edge_nodes"]
        assert edge["schema"] == 3 and edge["unserved_routes"] == []
        server.request("GET", "/api/v1/edge-nodes/me/config", auth=token,
                       headers={"X-Kokoa-Agent": f"{kokoa.__version__}; schema=1,2"})
        wait_until(lambda: server.request("GET", "/api/v1/edge-nodes")[2]["edge_nodes"][0][
            "schema"] == 2, timeout=5, what="the edge's schema to be 2")
        [edge] = server.request("GET", "/api/v1/edge-nodes")[2]["edge_nodes"]
        [unserved] = edge["unserved_routes"]
        assert unserved["hostname"] == "*.example.com"
        assert "wildcard" in unserved["reason"] and "schema-3 agent" in unserved["reason"]
        states = server.request("GET", "/api/v1/certificates")[2]["certificates"]
        assert [(c["name"], c["wildcard"], c["state"]) for c in states] == [
            ("*.example.com", True, "none"), ("a.example.com", False, "none")]
    finally:
        server.close()


def test_the_edge_payloads_of_schema_1_and_2_are_unchanged_by_schema_3():
    routes = {"a.example.com": {"upstream": "10.8.0.2:8080", "max_body_size": 0,
                                "buffering": True, "hsts": True, "access": None}}
    old = kokoa.render_nginx_map({"a.example.com": "10.8.0.2:8080"}, 128)
    payload2 = kokoa.edge_payload(routes, [], False, 2)[0]
    assert payload2["nginx_map"] == old and "schema" in payload2 and payload2["schema"] == 2
    payload3 = kokoa.edge_payload(routes, [], False, 3)[0]
    assert payload3["nginx_map"] == old.replace("    default \"\";",
                                                "    hostnames;\n    default \"\";")


VALUE = "gfj9Xq-Rr8cMAeD8sN7tZkHY2aBkW0tPq3vRhL5ZfYc"


@pytest.fixture
def knot_fleet(tmp_path):
    """A control plane whose DNS provider is a real knotd (RFC 2136, TSIG), with a wildcard
    route *.example.test and an exact one: (server, tokens, knot)."""
    require_tools("knotd", "kdig", "keymgr")
    knot = Knot(tmp_path, "example.test").start()
    server = InProcessServer(make_config(tmp_path / "kokoa.db", dns_settings=knot.env()))
    try:
        origin = server.create_origin()
        for hostname in ("*.example.test", "a.other.test"):
            server.create_route(hostname, origin["id"])
        tokens = {name: server.register_edge(name)[1] for name in ("edge1", "edge2")}
        yield server, tokens, knot
    finally:
        server.close()
        knot.stop()


def test_dns01_is_published_through_the_provider_and_removed_afterwards(knot_fleet):
    server, tokens, knot = knot_fleet
    path = "/dns-challenges/*.example.test"
    status, _, body = edge_call(server, tokens["edge1"], "PUT", path, {"value": VALUE})
    assert status == 409 and body["error"]["field"] == "name"        # claim first
    assert claim(server, tokens["edge1"], "*.example.test")[0] == 200
    status, _, body = edge_call(server, tokens["edge2"], "PUT", path, {"value": VALUE})
    assert status == 409                                             # only the holder
    # Answered once knotd serves it: no waiting needed afterwards.
    assert edge_call(server, tokens["edge1"], "PUT", path, {"value": VALUE})[0] == 204
    assert knot.dig("_acme-challenge.example.test", "TXT") == [f'"{VALUE}"']
    assert edge_call(server, tokens["edge2"], "DELETE", path)[0] == 409
    assert edge_call(server, tokens["edge1"], "DELETE", path)[0] == 204
    assert knot.dig("_acme-challenge.example.test", "TXT") == []


@pytest.mark.parametrize("name, body, status, field", [
    ("*.example.test", {"value": "short"}, 400, "value"),
    ("*.example.test", {"value": VALUE + '"; rm -rf /'}, 400, "value"),
    ("*.example.test", {"value": 5}, 400, "value"),
    ("*.example.test", {}, 400, "value"),
    ("*.example.test", {"value": VALUE, "ttl": 1}, 400, "ttl"),
    ("a.other.test", {"value": VALUE}, 400, "name"),               # not in the DNS zone
    ("b.example.test", {"value": VALUE}, 403, "name"),             # not a route
])
def test_a_malformed_dns01_request_is_a_4xx_naming_the_field(knot_fleet, name, body, status,
                                                             field):
    server, tokens, knot = knot_fleet
    if status != 403:
        assert claim(server, tokens["edge1"], name)[0] == 200
    answer = edge_call(server, tokens["edge1"], "PUT", f"/dns-challenges/{name}", body)
    assert answer[0] == status and answer[2]["error"]["field"] == field, answer
    assert knot.dig("_acme-challenge.example.test", "TXT") == []
