"""Health in the control plane (issue 16): the measurements of /me/status checked at the
boundary, GET /api/v1/sites and its rules, /metrics, alert targets (sealed URLs, formats,
retries, bounded storage) and the evaluator that sends each change once. A real waitress
server in this process and real webhook receivers on loopback; no mocks."""

import json
import time

import pytest

import kokoa
from conftest import InProcessServer, make_config, wait_until
from netlab import WebhookReceiver

FAR = "2099-01-01T00:00:00Z"


@pytest.fixture
def fast(tmp_path):
    """A control plane whose alerts retry and time out quickly and evaluate often."""
    server = InProcessServer(make_config(tmp_path / "kokoa.db", alert_retry_delays=(0.1, 0.2),
                                         alert_timeout=0.5, health_tick=0.2))
    yield server
    server.close()


@pytest.fixture
def receiver():
    item = WebhookReceiver()
    yield item
    item.close()


def fleet(api, hostnames=("app.example.com",), port=8080):
    """An origin, its routes and one edge that has polled: (origin, routes, token, config)."""
    origin = api.create_origin()
    routes = [api.create_route(name, origin["id"], port) for name in hostnames]
    edge_id, token = api.register_edge("edge1")
    _, _, config = api.my_config(token)
    return origin, routes, token, config


def report(api, token, config, up=True, port=8080, certificates=None, hosts=None, **extra):
    """POST a status with measurements; returns the HTTP status."""
    body = {"applied_hash": config["config_hash"], "ok": True,
            "certificates": certificates if certificates is not None else {
                "app.example.com": {"status": "valid", "not_after": FAR}},
            "interval_s": 30, "hosts": hosts or {},
            "origins": {"10.8.0.2": {"handshake_age_s": 20, "reachable": up, "rtt_ms": 1.5,
                                     "ports": {str(port): up}}}, **extra}
    status, _, answer = api.request("POST", "/api/v1/edge-nodes/me/status", body, auth=token)
    assert status == 204, answer
    return status


def sites(api):
    status, _, body = api.request("GET", "/api/v1/sites")
    assert status == 200
    return body


def only_site(api):
    [site] = sites(api)["sites"]
    return site


# The measurements at the boundary #########################################################

def test_measurements_are_stored_and_shown_on_the_edge_list(api):
    _, _, token, config = fleet(api)
    hosts = {"app.example.com": {"requests": 5, "status_4xx": 1, "status_5xx": 0,
                                 "upstream_errors": 0, "window_s": 30},
             "other.example.com": {"requests": 9, "status_4xx": 0, "status_5xx": 0,
                                   "upstream_errors": 0, "window_s": 30}}
    body = {"applied_hash": config["config_hash"], "ok": True, "interval_s": 10,
            "hosts": hosts, "origins": {
                "10.8.0.2": {"handshake_age_s": 5, "reachable": True, "rtt_ms": 3,
                             "ports": {"8080": True}},
                "10.8.0.99": {"handshake_age_s": None, "reachable": False, "rtt_ms": None}}}
    assert api.request("POST", "/api/v1/edge-nodes/me/status", body, auth=token)[0] == 204
    [edge] = api.request("GET", "/api/v1/edge-nodes")[2]["edge_nodes"]
    assert edge["state"] == "online"
    assert edge["origins"] == {"10.8.0.2": {"handshake_age_s": 5, "reachable": True,
                                            "rtt_ms": 3.0, "ports": {"8080": True}}}
    assert list(edge["hosts"]) == ["app.example.com"]     # not a route: dropped


def test_an_old_agent_s_status_without_measurements_keeps_working(api):
    _, _, token, config = fleet(api)
    report(api, token, config)
    body = {"applied_hash": config["config_hash"], "ok": True}
    assert api.request("POST", "/api/v1/edge-nodes/me/status", body, auth=token)[0] == 204
    [edge] = api.request("GET", "/api/v1/edge-nodes")[2]["edge_nodes"]
    assert edge["in_sync"] is True and edge["origins"] == {} and edge["hosts"] == {}
    assert only_site(api)["state"] == "ok"


GOOD_HOST = {"requests": 3, "status_4xx": 1, "status_5xx": 1, "upstream_errors": 1,
             "window_s": 30}
HOSTILE_MEASUREMENTS = [
    ("interval_s", {"interval_s": -1}),
    ("interval_s", {"interval_s": True}),
    ("interval_s", {"interval_s": 86401}),
    ("origins", {"origins": []}),
    ("origins", {"origins": {"not-an-ip": {}}}),
    ("origins", {"origins": {"10.8.0.2": {"reachable": "yes"}}}),
    ("origins", {"origins": {"10.8.0.2": {"handshake_age_s": -5}}}),
    ("origins", {"origins": {"10.8.0.2": {"rtt_ms": 1e9}}}),
    ("origins", {"origins": {"10.8.0.2": {"rtt_ms": False}}}),
    ("origins", {"origins": {"10.8.0.2": {"extra": 1}}}),
    ("origins", {"origins": {"10.8.0.2": {"ports": {"0": True}}}}),
    ("origins", {"origins": {"10.8.0.2": {"ports": {"80": "up"}}}}),
    ("ports", {"origins": {"10.8.0.2": {"ports": {str(p): True for p in range(1, 70)}}}}),
    ("origins", {"origins": {f"10.9.{i // 250}.{i % 250 + 1}": {} for i in range(1025)}}),
    ("hosts", {"hosts": {"bad host": GOOD_HOST}}),
    ("hosts", {"hosts": {"app.example.com": {**GOOD_HOST, "requests": -1}}}),
    ("hosts", {"hosts": {"app.example.com": {**GOOD_HOST, "requests": 1}}}),
    ("hosts", {"hosts": {"app.example.com": {**GOOD_HOST, "upstream_errors": 4}}}),
    ("hosts", {"hosts": {"app.example.com": {"requests": 1}}}),
    ("hosts", {"hosts": {"app.example.com": {**GOOD_HOST, "window_s": 1.5}}}),
    ("hosts", {"hosts": {"app.example.com": {**GOOD_HOST, "requests": 10 ** 13}}}),
]


@pytest.mark.parametrize(("field", "extra"), HOSTILE_MEASUREMENTS)
def test_hostile_measurements_are_refused_naming_the_field(api, field, extra):
    _, _, token, config = fleet(api)
    before = api.snapshot()
    body = {"applied_hash": config["config_hash"], "ok": True, **extra}
    status, _, answer = api.request("POST", "/api/v1/edge-nodes/me/status", body, auth=token)
    assert status == 400, answer
    assert answer["error"]["field"] == field
    assert api.snapshot() == before


def test_a_hosts_map_over_the_limit_is_refused(api, monkeypatch):
    monkeypatch.setitem(kokoa.HEALTH_LIMITS, "hosts", 2)
    _, _, token, config = fleet(api)
    hosts = {f"h{i}.example.com": GOOD_HOST for i in range(3)}
    body = {"applied_hash": config["config_hash"], "ok": True, "hosts": hosts}
    status, _, answer = api.request("POST", "/api/v1/edge-nodes/me/status", body, auth=token)
    assert status == 400 and answer["error"]["field"] == "hosts"


# GET /api/v1/sites ########################################################################

def test_a_healthy_site_is_ok_with_its_traffic(api):
    origin, [route], token, config = fleet(api)
    report(api, token, config, hosts={"app.example.com": GOOD_HOST})
    body = sites(api)
    site = body["sites"][0]
    assert site == {"hostname": "app.example.com", "route_id": route["id"],
                    "origin_id": origin["id"], "origin_name": "home", "state": "ok",
                    "reasons": [], "certificate": {"state": "valid", "not_after": FAR},
                    "traffic": GOOD_HOST}
    assert body["summary"] == {"sites": {"ok": 1, "degraded": 0, "down": 0, "disabled": 0},
                               "edges": {"online": 1, "stale": 0, "offline": 0, "never": 0},
                               "certificates": {"expiring": 0, "failed": 0}}
    assert body["edges"][0]["state"] == "online" and body["edges"][0]["last_seen"]


def test_without_an_edge_every_site_is_down(api):
    origin = api.create_origin()
    api.create_route("app.example.com", origin["id"])
    site = only_site(api)
    assert site["state"] == "down"
    assert site["reasons"][0]["message"] == "no edge serves it yet"


def test_an_origin_that_does_not_answer_makes_the_site_down(api):
    _, _, token, config = fleet(api)
    report(api, token, config, up=False)
    site = only_site(api)
    assert site["state"] == "down"
    [why] = site["reasons"]
    assert why["kind"] == "origin" and why["edge_name"] == "edge1"
    assert "cannot connect to origin home on port 8080" in why["message"]


@pytest.mark.parametrize(("certificate", "state", "kind"), [
    ({"status": "valid", "not_after": kokoa.iso_time(time.time() + 5 * 86400)}, "degraded",
     "certificate"),
    ({"status": "failed", "error": "too many certificates"}, "down", "certificate"),
    ({"status": "pending"}, "degraded", "certificate"),
])
def test_certificate_states_shape_the_site(api, certificate, state, kind):
    _, _, token, config = fleet(api)
    report(api, token, config, certificates={"app.example.com": certificate})
    site = only_site(api)
    assert site["state"] == state and [r["kind"] for r in site["reasons"]] == [kind]
    summary = sites(api)["summary"]["certificates"]
    assert summary["expiring"] == (state == "degraded" and certificate["status"] == "valid")


def test_a_high_error_rate_degrades_the_site(api):
    _, _, token, config = fleet(api)
    hosts = {"app.example.com": {"requests": 20, "status_4xx": 0, "status_5xx": 4,
                                 "upstream_errors": 0, "window_s": 30}}
    report(api, token, config, hosts=hosts)
    site = only_site(api)
    assert site["state"] == "degraded" and site["reasons"][0]["kind"] == "error_rate"
    assert "4 of 20 requests failed" in site["reasons"][0]["message"]


def test_an_edge_out_of_sync_or_failing_degrades_and_a_disabled_route_is_disabled(api):
    _, [route], token, config = fleet(api)
    body = {"applied_hash": "0" * 64, "ok": False, "error": "nginx -t failed"}
    assert api.request("POST", "/api/v1/edge-nodes/me/status", body, auth=token)[0] == 204
    site = only_site(api)
    assert site["state"] == "degraded"
    assert {r["kind"] for r in site["reasons"]} == {"sync"}
    assert api.request("PATCH", f"/api/v1/routes/{route['id']}", {"enabled": False})[0] == 200
    site = only_site(api)
    assert site["state"] == "disabled" and site["reasons"] == []


def test_an_edge_turns_stale_then_offline_and_its_sites_go_down(api):
    _, _, token, config = fleet(api)
    report(api, token, config)
    db = kokoa.connect(api.config.db_path)
    try:
        configs = {s: api.app.edge_config.get(kokoa.DbContext(db), s) for s in kokoa.SCHEMAS}
        seen = api.app.last_seen.get
        now = time.time()
        assert kokoa.sites_view(db, configs, seen, now)["edges"][0]["state"] == "online"
        stale = kokoa.sites_view(db, configs, seen, now + 3 * 30 + 5)
        assert stale["edges"][0]["state"] == "stale"
        assert stale["sites"][0]["state"] == "degraded"
        offline = kokoa.sites_view(db, configs, seen, now + 10 * 30 + 5)
        assert offline["edges"][0]["state"] == "offline"
        assert offline["sites"][0]["state"] == "down"
        assert offline["sites"][0]["reasons"][0]["kind"] == "edge"
        assert "edge_offline" in {event for event, _, _ in
                                  kokoa.alert_conditions(offline).values()}
    finally:
        db.close()


def test_metrics_export_the_sites_and_edge_states(api):
    _, _, token, config = fleet(api)
    report(api, token, config, up=False)
    text = api.request("GET", "/metrics", auth=None)[2].decode()
    assert 'kokoa_sites{state="down"} 1' in text
    assert 'kokoa_edge_states{state="online"} 1' in text
    assert 'kokoa_certificates{state="expiring"} 0' in text
    assert 'kokoa_site_state{hostname="app.example.com",state="down"} 1' in text


# Alert targets ############################################################################

def create_target(api, url, **fields):
    status, _, body = api.request("POST", "/api/v1/alert-targets",
                                  {"name": fields.pop("name", "ops"), "url": url, **fields})
    assert status == 201, body
    return body


def test_a_target_s_url_is_write_only_and_sealed(api):
    url = "https://hooks.slack.com/services/T000/B000/secretsecretsecret"
    target = create_target(api, url, format="slack", events=["site_down", "edge_offline"])
    for other in ("http://[::1]:8080/x", "http://ntfy:80/topic", "https://192.0.2.1/h"):
        create_target(api, other, name=other)
    assert target["url_display"] == "https://hooks.slack.com/…"
    assert target["events"] == ["edge_offline", "site_down"] and "url" not in target
    listing = json.dumps(api.request("GET", "/api/v1/alert-targets")[2])
    db = kokoa.connect(api.config.db_path)
    assert kokoa.stored_row_problems(db, None) == []        # what the API stores, restore takes
    db.close()
    assert "secretsecret" not in listing
    [[blob]] = api.rows("SELECT url_enc FROM alert_targets WHERE id = ?", (target["id"],))
    assert b"secretsecret" not in blob and b"hooks.slack" not in blob
    status, _, patched = api.request("PATCH", f"/api/v1/alert-targets/{target['id']}",
                                     {"url": "https://ntfy.sh/kokoa-topic", "format": "ntfy"})
    assert status == 200 and patched["url_display"] == "https://ntfy.sh/…"
    assert api.request("DELETE", f"/api/v1/alert-targets/{target['id']}")[0] == 204
    assert api.request("GET", f"/api/v1/alert-targets/{target['id']}")[0] == 404


@pytest.mark.parametrize(("field", "body"), [
    ("url", {"name": "x", "url": "ftp://example.com/"}),
    ("url", {"name": "x", "url": "https://user:pw@example.com/hook"}),
    ("url", {"name": "x", "url": "https://example.com/" + "a" * 2048}),
    ("url", {"name": "x", "url": "https://exämple.com/"}),
    ("url", {"name": "x", "url": "https://example.com/a b"}),
    ("url", {"name": "x", "url": "https://example.com:99999/"}),
    ("url", {"name": "x", "url": "https:///nohost"}),
    ("url", {"name": "x", "url": "https://exa!mple.com/"}),
    ("url", {"name": "x", "url": "https://[fe80::1%25eth0]/"}),
    ("url", {"name": "x", "url": 5}),
    ("url", {"name": "x"}),
    ("format", {"name": "x", "url": "https://example.com/", "format": "email"}),
    ("events", {"name": "x", "url": "https://example.com/", "events": []}),
    ("events", {"name": "x", "url": "https://example.com/", "events": ["everything"]}),
    ("events", {"name": "x", "url": "https://example.com/", "events": "site_down"}),
    ("name", {"name": "", "url": "https://example.com/"}),
    ("colour", {"name": "x", "url": "https://example.com/", "colour": "red"}),
])
def test_invalid_targets_are_refused_naming_the_field(api, field, body):
    status, _, answer = api.request("POST", "/api/v1/alert-targets", body)
    assert status == 400 and answer["error"]["field"] == field, answer
    assert api.rows("SELECT count(*) FROM alert_targets") == [(0,)]


def test_target_names_are_unique(api):
    create_target(api, "https://example.com/a")
    status, _, answer = api.request("POST", "/api/v1/alert-targets",
                                    {"name": "OPS", "url": "https://example.com/b"})
    assert status == 409 and answer["error"]["field"] == "name"


def test_rotating_the_key_reseals_target_urls(api, tmp_path):
    url = "https://example.com/hook/secretpath"
    target = create_target(api, url)
    new = kokoa.Keyring(bytes(range(32)), old=[api.config.keyring.current])
    db = kokoa.connect(api.config.db_path)
    try:
        assert kokoa.rotate_secrets(db, new) == 1
        blob = db.execute("SELECT url_enc FROM alert_targets").fetchone()[0]
        assert new.is_current(blob)
        aad = kokoa.secret_aad("alert_targets", target["id"], "url")
        assert new.unseal(blob, aad) == url.encode()
    finally:
        db.close()


def test_restore_checks_the_alert_rows(api, tmp_path):
    from conftest import edited_backup
    create_target(api, "https://example.com/hook")
    _, _, token, config = fleet(api)
    report(api, token, config)
    good = tmp_path / "good.db"
    kokoa.backup_database(api.config.db_path, str(good))
    db = kokoa.connect(str(good))
    assert kokoa.stored_row_problems(db, None) == []
    db.close()
    bad = edited_backup(api.config.db_path, tmp_path / "bad.db",
                        "UPDATE alert_targets SET events = '[\"everything\"]'",
                        "UPDATE edge_nodes SET health = '{\"interval_s\": -4}'")
    db = kokoa.connect(str(bad))
    problems = kokoa.stored_row_problems(db, None)
    db.close()
    assert any("alert_targets" in p and "events" in p for p in problems), problems
    assert any("edge_nodes" in p and "interval_s" in p for p in problems), problems


@pytest.mark.parametrize(("fmt", "check"), [
    ("json", lambda item: json.loads(item["body"])["event"] == "test"),
    ("slack", lambda item: json.loads(item["body"])["text"].startswith("[Kokoa test]")),
    ("discord", lambda item: "test alert" in json.loads(item["body"])["content"]),
    ("ntfy", lambda item: item["headers"]["Title"] == "Kokoa test"
     and item["body"].startswith(b"test alert")),
])
def test_the_test_button_sends_each_format(fast, receiver, fmt, check):
    target = create_target(fast, receiver.url + "/hook?token=abc", format=fmt)
    status, _, delivery = fast.request("POST", f"/api/v1/alert-targets/{target['id']}/test", {})
    assert status == 202 and delivery["state"] == "pending" and delivery["event"] == "test"
    wait_until(lambda: receiver.received, timeout=10, what="the test webhook")
    [item] = receiver.received
    assert item["path"] == "/hook?token=abc" and check(item)

    def delivered():
        _, _, body = fast.request("GET", f"/api/v1/alert-targets/{target['id']}/deliveries")
        return body["deliveries"][0]["state"] == "delivered" and body["deliveries"][0]
    done = wait_until(delivered, timeout=10, what="the delivery to be recorded")
    assert done["status_code"] == 204 and done["attempts"] == 1 and done["error"] is None


def test_a_failing_receiver_is_retried_then_recorded_as_failed(fast):
    failing = WebhookReceiver(status=500)
    try:
        target = create_target(fast, failing.url + "/")
        fast.request("POST", f"/api/v1/alert-targets/{target['id']}/test", {})

        def failed():
            _, _, body = fast.request("GET",
                                      f"/api/v1/alert-targets/{target['id']}/deliveries")
            return body["deliveries"][0]["state"] == "failed" and body["deliveries"][0]
        delivery = wait_until(failed, timeout=15, what="the delivery to fail")
        assert delivery["attempts"] == 3 and delivery["status_code"] == 500
        assert delivery["error"] == "the receiver answered HTTP 500"
        assert len(failing.received) == 3
        assert fast.request("GET", "/healthz")[0] == 200
    finally:
        failing.close()


def test_a_hanging_receiver_never_delays_the_api_or_the_edges(fast):
    hanging = WebhookReceiver(hang=True)
    try:
        _, _, token, config = fleet(fast)
        target = create_target(fast, hanging.url + "/")
        for _ in range(3):
            fast.request("POST", f"/api/v1/alert-targets/{target['id']}/test", {})
        wait_until(lambda: hanging.received, timeout=10, what="the receiver to be called")
        slowest = 0.0
        for _ in range(20):
            started = time.monotonic()
            assert fast.my_config(token)[0] == 200
            report(fast, token, config)
            slowest = max(slowest, time.monotonic() - started)
        print(f"slowest poll + report while the receiver hangs: {slowest * 1000:.0f} ms")
        assert slowest < fast.config.alert_timeout          # never waits for the receiver

        def all_failed():
            _, _, body = fast.request("GET",
                                      f"/api/v1/alert-targets/{target['id']}/deliveries")
            return all(d["state"] == "failed" for d in body["deliveries"]) and body
        body = wait_until(all_failed, timeout=30, what="the hanging deliveries to fail")
        assert all("timed out" in d["error"] for d in body["deliveries"]), body
    finally:
        hanging.close()


def test_deliveries_are_bounded_per_target(fast, receiver, monkeypatch):
    monkeypatch.setattr(kokoa, "ALERT_DELIVERIES_KEPT", 3)
    target = create_target(fast, receiver.url + "/")
    for _ in range(5):
        fast.request("POST", f"/api/v1/alert-targets/{target['id']}/test", {})
    assert fast.rows("SELECT count(*) FROM alert_deliveries") == [(3,)]


def test_each_change_of_state_is_sent_once_and_once_when_it_clears(fast, receiver):
    _, _, token, config = fleet(fast)
    report(fast, token, config)
    create_target(fast, receiver.url + "/", events=["site_down", "origin_down"])
    fast.app.health.start()
    report(fast, token, config, up=False)
    wait_until(lambda: len(receiver.received) >= 2, timeout=10, what="the down alerts")
    for _ in range(3):                  # more reports and evaluations: nothing new is sent
        report(fast, token, config, up=False)
    time.sleep(1.0)                     # the evaluator runs every 0.2 s: give it the chance
    fired = receiver.json_bodies()
    assert sorted((b["event"], b["state"]) for b in fired) == [
        ("origin_down", "firing"), ("site_down", "firing")]
    assert "cannot connect to origin home on port 8080" in next(
        b["message"] for b in fired if b["event"] == "site_down")
    report(fast, token, config, up=True)
    wait_until(lambda: len(receiver.received) >= 4, timeout=10, what="the resolved alerts")
    time.sleep(1.0)
    assert sorted((b["event"], b["state"]) for b in receiver.json_bodies()[2:]) == [
        ("origin_down", "resolved"), ("site_down", "resolved")]
    assert len(receiver.received) == 4
    password = fast.config.admin_password
    assert not any(password in item["body"].decode() for item in receiver.received)


def test_deliveries_left_pending_by_a_previous_run_are_failed_at_start(api):
    target = create_target(api, "https://example.com/hook")
    db = kokoa.connect(api.config.db_path)
    try:
        kokoa.insert_deliveries(db, [("firing", "site_down", "a.example.com", "down")])
    finally:
        db.close()
    api.app.health.start()
    [delivery] = api.request("GET", f"/api/v1/alert-targets/{target['id']}/deliveries")[2][
        "deliveries"]
    assert delivery["state"] == "failed" and "restart" in delivery["error"]


def test_an_error_never_carries_the_webhook_s_path():
    url = "https://hooks.example.com/services/T0/B0/secret?token=abc"
    text = kokoa.without_url_path(f"InvalidURL: bad {url} and /services/T0/B0/secret", url)
    assert "secret" not in text and "token=abc" not in text and "hooks.example.com" in text


def test_a_condition_is_sent_once_also_across_a_restart(api, tmp_path):
    _, _, token, config = fleet(api)
    target = create_target(api, "http://127.0.0.1:9/", events=["site_down",
                                                               "edge_apply_failed"])
    report(api, token, config, up=False, ok=False, error="nginx -t failed")
    api.app.health.evaluate()
    api.app.health.evaluate()
    again = kokoa.make_app(api.config)                   # a restarted control plane
    try:
        again.health.evaluate()
    finally:
        again.close()
    rows = api.rows("SELECT event, resolved FROM alert_deliveries WHERE target_id = ? "
                    "ORDER BY event", (target["id"],))
    assert rows == [("edge_apply_failed", 0), ("site_down", 0)]
    messages = [row[0] for row in api.rows("SELECT message FROM alert_deliveries")]
    assert any("nginx -t failed" in message for message in messages)


def test_polls_missed_while_the_control_plane_was_down_do_not_count(api):
    _, _, token, config = fleet(api)
    report(api, token, config)
    db = kokoa.connect(api.config.db_path)
    try:
        configs = {s: api.app.edge_config.get(kokoa.DbContext(db), s) for s in kokoa.SCHEMAS}
        later = time.time() + 3600                      # an hour of downtime, then a restart
        def nobody(_):
            return None
        view = kokoa.sites_view(db, configs, nobody, later, not_before=later - 5)
        assert view["edges"][0]["state"] == "online"
        assert kokoa.sites_view(db, configs, nobody, later)["edges"][0]["state"] == "offline"
    finally:
        db.close()
