"""What the UI's forms rely on in the API (issue 16): every field at fault at once
(`error.fields`), hostnames typed as URLs, and the Unicode form of IDN hostnames."""

import pytest

import kokoa

ORIGIN_KEY = "8cHeykp4BvaGOmRjnBp0Zd7Qw9ia7DEp3eE+2bV3KUI="


def fields_of(error):
    return [entry["field"] for entry in error["error"]["fields"]]


def test_a_route_with_several_faults_names_them_all_and_the_first_stays_field(api):
    status, _, error = api.request("POST", "/api/v1/routes", {
        "hostname": "localhost", "origin_id": "nope", "target_port": 70000,
        "max_body_size": -1, "access_policy_id": "missing"})
    assert status == 400
    assert fields_of(error) == ["hostname", "target_port", "max_body_size", "origin_id",
                                "access_policy_id"]
    assert error["error"]["field"] == "hostname"
    assert error["error"]["message"] == error["error"]["fields"][0]["message"]
    assert all(entry["message"] for entry in error["error"]["fields"])
    status, _, error = api.request("POST", "/api/v1/routes", {})
    assert status == 400 and fields_of(error) == ["hostname", "origin_id", "target_port"]
    assert api.rows("SELECT * FROM routes") == []


def test_a_route_patch_names_every_field_at_fault_and_changes_nothing(api):
    origin = api.create_origin()
    route = api.create_route("app.example.com", origin["id"])
    status, _, error = api.request("PATCH", f"/api/v1/routes/{route['id']}", {
        "hostname": "https://app.example.com/admin", "target_port": 0, "hsts": "yes"})
    assert status == 400 and fields_of(error) == ["hostname", "target_port", "hsts"]
    assert api.request("GET", f"/api/v1/routes/{route['id']}")[2]["target_port"] == 8080


def test_an_origin_with_several_faults_names_them_all(api):
    status, _, error = api.request("POST", "/api/v1/origins", {
        "name": "", "wg_ip": "not-an-ip", "wg_endpoint": "no-port", "wg_public_key": "short"})
    assert status == 400
    assert fields_of(error) == ["name", "wg_endpoint", "wg_public_key", "wg_ip"]
    origin = api.create_origin()
    status, _, error = api.request("PATCH", f"/api/v1/origins/{origin['id']}", {
        "name": "x" * 65, "wg_ip": "127.0.0.1", "wg_endpoint": "a:b"})
    assert status == 400 and fields_of(error) == ["name", "wg_ip", "wg_endpoint"]
    assert api.request("GET", f"/api/v1/origins/{origin['id']}")[2]["name"] == origin["name"]


def test_one_fault_is_answered_as_before_with_fields_of_one(api):
    origin = api.create_origin()
    status, _, error = api.request("POST", "/api/v1/routes", {
        "hostname": "app.example.com", "origin_id": origin["id"], "target_port": "80"})
    assert status == 400 and error["error"]["field"] == "target_port"
    assert fields_of(error) == ["target_port"]
    # conflicts come once the fields are valid, one at a time, as before
    api.create_route("taken.example.com", origin["id"])
    status, _, error = api.request("POST", "/api/v1/routes", {
        "hostname": "taken.example.com", "origin_id": origin["id"], "target_port": 80})
    assert status == 409 and error["error"]["field"] == "hostname"


@pytest.mark.parametrize("typed, stored", [
    ("https://app.example.com/", "app.example.com"),
    ("http://App.Example.COM", "app.example.com"),
    ("app.example.com/", "app.example.com"),
    ("https://bücher.example.org/", "xn--bcher-kva.example.org"),
    ("https://app.example.com./", "app.example.com"),
])
def test_a_hostname_typed_as_a_url_is_stored_as_its_name(api, typed, stored):
    origin = api.create_origin()
    status, _, route = api.request("POST", "/api/v1/routes", {
        "hostname": typed, "origin_id": origin["id"], "target_port": 80})
    assert status == 201 and route["hostname"] == stored
    status, _, route = api.request("PATCH", f"/api/v1/routes/{route['id']}",
                                   {"hostname": typed.lower().replace("app", "www")})
    assert status == 200 and route["hostname"] == stored.replace("app", "www")


@pytest.mark.parametrize("typed, words", [
    ("https://app.example.com:8443/", "port"),
    ("app.example.com:443", "port"),
    ("https://app.example.com/path", "path"),
    ("https://app.example.com/?next=/", "path"),
    ("https://app.example.com/#top", "path"),
    ("https://user:pw@app.example.com/", "user name"),
    ("ftp://app.example.com/", "https://"),
    ("https://", "https://"),
    ("http://[::1", "name"),
    ("https://[2001:db8::1]/", "IP address"),
    ("https://app.example.com\t/", "control"),
])
def test_a_url_with_more_than_a_name_is_refused_never_trimmed(api, typed, words):
    origin = api.create_origin()
    status, _, error = api.request("POST", "/api/v1/routes", {
        "hostname": typed, "origin_id": origin["id"], "target_port": 80})
    assert status == 400 and error["error"]["field"] == "hostname", error
    assert words in error["error"]["message"]
    assert api.rows("SELECT * FROM routes") == []


def test_an_idn_route_carries_its_unicode_form(api):
    origin = api.create_origin()
    idn = api.create_route("bücher.example.org", origin["id"])
    plain = api.create_route("plain.example.org", origin["id"])
    assert idn["hostname"] == "xn--bcher-kva.example.org"
    assert idn["hostname_unicode"] == "bücher.example.org"
    assert plain["hostname_unicode"] is None
    listed = {r["hostname"]: r for r in api.request("GET", "/api/v1/routes")[2]["routes"]}
    assert listed["xn--bcher-kva.example.org"]["hostname_unicode"] == "bücher.example.org"
    assert kokoa.hostname_unicode("xn--zz.example.org") is None     # undecodable: no guess


def test_a_wildcard_typed_as_a_url_is_refused_without_a_dns_provider(api):
    origin = api.create_origin()
    for hostname in ("*.example.com", "https://*.example.com/"):
        status, _, error = api.request("POST", "/api/v1/routes", {
            "hostname": hostname, "origin_id": origin["id"], "target_port": 8080})
        assert status == 400 and error["error"]["field"] == "hostname", error
        assert "DNS provider" in error["error"]["message"]
    assert api.request("GET", "/api/v1/routes")[2]["routes"] == []


def test_a_policy_with_several_faults_names_them_all_and_writes_nothing(api):
    status, _, error = api.request("POST", "/api/v1/access-policies", {
        "name": "", "allow": ["not-a-cidr"], "require": "most", "pass_authorization": "yes"})
    assert status == 400
    assert fields_of(error) == ["name", "allow", "require", "pass_authorization"]
    assert error["error"]["field"] == "name"                  # the first, as before
    assert api.request("GET", "/api/v1/access-policies")[2]["access_policies"] == []


def test_an_alert_target_with_several_faults_names_them_all_and_writes_nothing(api):
    status, _, error = api.request("POST", "/api/v1/alert-targets", {
        "url": "ftp://hooks.example/x", "format": "telegram", "events": ["everything"]})
    assert status == 400
    assert fields_of(error) == ["name", "url", "format", "events"]
    assert api.request("GET", "/api/v1/alert-targets")[2]["alert_targets"] == []
    status, _, target = api.request("POST", "/api/v1/alert-targets", {
        "name": "pager", "url": "https://hooks.example/x"})
    assert status == 201, target
    status, _, error = api.request("PATCH", f"/api/v1/alert-targets/{target['id']}", {
        "name": "x" * 65, "format": "telegram"})
    assert status == 400 and fields_of(error) == ["name", "format"]
    assert api.request("GET", f"/api/v1/alert-targets/{target['id']}")[2]["name"] == "pager"
