"""The Prefect API URL rules (the CRD's CEL rules, repeated by the operator) and the allowlist."""

from __future__ import annotations

import pytest

from pgw_operator.api_url import AllowedApiUrls, ApiUrlRejected, parse_api_url

# (url, the rule the message names); the same forms are rejected at admission
# (tests/k8s/test_operator.py INVALID_SPECS).
REJECTED = [
    ("ftp://prefect/api", "must start with http:// or https://"),
    ("//prefect/api", "must start with http:// or https://"),
    ("prefect:4200/api", "must start with http:// or https://"),
    ("http://user:pw@prefect/api", "userinfo"),
    ("http://prefect@127.0.0.1:8080/api", "userinfo"),
    ("http://127.0.0.1:8080/internal/admin?x=", "query"),
    ("http://prefect/api#frag", "fragment"),
    ("http://prefect/ api", "whitespace"),
    ("http://prefect/api\n", "whitespace"),
    ("http://prefect\\@evil/api", "userinfo"),
    ("http://evil\\prefect/api", "URL characters"),
    ("http://prefect/api\x00", "URL characters"),
    ("http://préfect/api", "URL characters"),
    ("http:///api", "must name a host"),
    ("http://:4200/api", "must name a host"),
    ("http://prefect/api/../admin", ". or .. path segments"),
    ("http://prefect/api/%2e%2e/admin", ". or .. path segments"),
    ("http://prefect/api%2F..%2Fadmin", "percent-encode"),
    ("http://prefect/api%3Fx=", "percent-encode"),
    ("http://prefect:99999/api", "port"),
    ("http://prefect:0/api", "port"),
]

# Beyond the CRD's CEL rules: the operator's own check (issue 22), a condition
# naming the rule, never a crash or a request.
REJECTED_BY_THE_OPERATOR = [
    ("http://[abc]/api", "bracketed one must be an IPv6 address"),
    ("http://2130706433/api", "four decimal numbers"),
    ("http://0x7f.1/api", "four decimal numbers"),
    ("http://0177.0.0.1/api", "four decimal numbers"),
    ("http://127.1/api", "four decimal numbers"),
    ("http://[::ffff:a00:1]/api", "not inside an IPv6 one"),
    ("http://[::ffff:127.0.0.1]:4200/api", "not inside an IPv6 one"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://[fe80::1]/api", "link-local"),
]


@pytest.mark.parametrize(
    ("url", "rule"), REJECTED_BY_THE_OPERATOR, ids=[u for u, _ in REJECTED_BY_THE_OPERATOR]
)
def test_other_spellings_of_an_address_and_link_local_ones_are_rejected(
    url: str, rule: str
) -> None:
    with pytest.raises(ApiUrlRejected) as info:
        parse_api_url(url)
    assert info.value.reason == "ApiUrlInvalid"
    assert rule in str(info.value)
    assert str(info.value).startswith("spec.prefect.apiUrl ")


ACCEPTED = [
    "http://prefect-server.prefect.svc.cluster.local:4200/api",
    "https://api.prefect.cloud/api/accounts/1b2c/workspaces/3d4e",
    "http://127.0.0.1:4200/api",
    "http://10.0.0.7:4200/api",
    "http://123.example:4200/api",
    "http://[::1]:4200/api/",
    "HTTP://Prefect:4200/api".lower(),
]


@pytest.mark.parametrize(("url", "rule"), REJECTED, ids=[u for u, _ in REJECTED])
def test_malformed_urls_are_rejected_naming_the_field_and_rule(url: str, rule: str) -> None:
    with pytest.raises(ApiUrlRejected) as info:
        parse_api_url(url)
    assert info.value.reason == "ApiUrlInvalid"
    assert str(info.value).startswith("spec.prefect.apiUrl ")
    assert rule in str(info.value)


@pytest.mark.parametrize("url", ACCEPTED)
def test_plain_prefect_urls_are_accepted(url: str) -> None:
    parsed = parse_api_url(url)
    assert parsed.scheme in ("http", "https")
    assert not parsed.path.endswith("/")


def test_parts_and_default_ports() -> None:
    url = parse_api_url("https://Prefect.Example/api/")
    assert (url.scheme, url.host, url.port, url.path) == ("https", "prefect.example", 443, "/api")
    assert parse_api_url("http://[::1]:4200/api").host == "::1"


def test_request_urls_encode_the_operators_own_segments() -> None:
    base = parse_api_url("http://prefect:4200/api")
    # A name can neither start a query or fragment nor climb out of the path.
    assert (
        base.request_url("work_pools", "a?x=#y")
        == "http://prefect:4200/api/work_pools/a%3Fx%3D%23y"
    )
    assert base.request_url("v2", "concurrency_limits", "..") == (
        "http://prefect:4200/api/v2/concurrency_limits/.."
    )
    assert base.request_url("v2", "concurrency_limits", "gpu:pod/x") == (
        "http://prefect:4200/api/v2/concurrency_limits/gpu%3Apod%2Fx"
    )
    assert base.request_url("work_pools", "") == "http://prefect:4200/api/work_pools/"


ALLOWED = AllowedApiUrls.parse(["http://prefect.prefect.svc:4200/api", "https://api.prefect.cloud"])


@pytest.mark.parametrize(
    ("url", "permitted"),
    [
        ("http://prefect.prefect.svc:4200/api", True),
        ("http://prefect.prefect.svc:4200/api/", True),
        ("http://PREFECT.prefect.svc:4200/api/sub", True),
        ("https://api.prefect.cloud/api/accounts/a/workspaces/b", True),
        ("https://api.prefect.cloud:443/api", True),
        ("http://prefect.prefect.svc:4200/apix", False),  # not at a segment boundary
        ("http://prefect.prefect.svc:4200", False),  # above the allowed path
        ("http://prefect.prefect.svc:4201/api", False),  # another port
        ("https://prefect.prefect.svc:4200/api", False),  # another scheme
        ("http://prefect.prefect.svc.evil.example:4200/api", False),  # a string prefix only
        ("http://api.prefect.cloud/api", False),  # http, not https
        ("http://127.0.0.1:4200/api", False),
    ],
)
def test_allowlist_compares_scheme_host_port_and_whole_path_segments(
    url: str, permitted: bool
) -> None:
    assert ALLOWED.permits("any-namespace", parse_api_url(url)) is permitted


def test_url_outside_the_allowlist_is_refused_naming_field_and_rule() -> None:
    with pytest.raises(ApiUrlRejected) as info:
        ALLOWED.check("http://10.0.0.1:8080/internal/admin", "team-a")
    assert info.value.reason == "ApiUrlNotAllowed"
    assert "spec.prefect.apiUrl" in str(info.value)
    assert "--allowed-api-url" in str(info.value)
    assert "namespace team-a" in str(info.value)


def test_an_entry_with_a_namespace_serves_only_that_namespace() -> None:
    """Team A's server is not team B's to point at."""
    allowed = AllowedApiUrls.parse([
        "team-a=https://prefect.team-a.svc/api",
        "*=https://api.prefect.cloud/api",
        "team-b=http://prefect.team-b.svc:4200/api",  # http only where an entry says so
    ])  # fmt: skip
    team_a = parse_api_url("https://prefect.team-a.svc/api/x")
    assert allowed.permits("team-a", team_a)
    assert not allowed.permits("team-b", team_a)
    cloud = parse_api_url("https://api.prefect.cloud/api/accounts/a")
    assert allowed.permits("team-a", cloud)
    assert allowed.permits("team-b", cloud)
    assert allowed.permits("team-b", parse_api_url("http://prefect.team-b.svc:4200/api"))
    assert not allowed.permits("team-b", parse_api_url("http://api.prefect.cloud/api"))
    assert [e.namespace for e in allowed.entries] == ["team-a", "*", "team-b"]


def test_no_entry_allows_nothing_unless_any_url_is_allowed_out_loud() -> None:
    with pytest.raises(ApiUrlRejected) as info:
        AllowedApiUrls().check("https://prefect.example/api", "team-a")
    assert info.value.reason == "ApiUrlNotAllowed"
    assert "allows no API URL" in str(info.value)
    everything = AllowedApiUrls(allow_any=True)
    assert everything.check("http://anything.example:1/x", "team-a").host == "anything.example"
    with pytest.raises(ApiUrlRejected) as info:
        everything.check("http://x/?y", "team-a")
    assert info.value.reason == "ApiUrlInvalid"


@pytest.mark.parametrize(
    "entry", ["http://prefect/api?x", "Team_A=https://prefect/api", "=https://prefect/api"]
)
def test_allowlist_entries_must_be_valid_themselves(entry: str) -> None:
    with pytest.raises(ApiUrlRejected):
        AllowedApiUrls.parse([entry])


def test_an_entry_whose_url_holds_an_equals_sign_is_not_read_as_a_namespace() -> None:
    (entry,) = AllowedApiUrls.parse(["https://prefect/api/a=b"]).entries
    assert (entry.namespace, entry.prefix.path) == ("*", "/api/a=b")
