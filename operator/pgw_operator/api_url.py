"""Which Prefect API URLs a pool may name, and the request URLs built from them: pure.

The operator sends requests, with the pool's API key, from its own network
position. Whoever may create a GpuWorkerPool picks ``spec.prefect.apiUrl``, so
before any request the URL is checked twice:

- its form (:func:`parse_api_url`): the CRD's CEL rules, repeated here for pools
  admitted before those rules existed;
- the operator's allowlist (:class:`AllowedApiUrls`, ``--allowed-api-url``):
  the tenant boundary. Each entry scopes a URL prefix to one namespace or to
  all; with none, nothing is allowed unless ``--allow-any-api-url`` says so.
  Prefixes are compared part by part (scheme, host, port, then the path at a
  ``/`` boundary), never as strings or regexes: ``http://prefect:4200/api``
  allows ``http://prefect:4200/api/x`` but neither ``http://prefect:4200/apix``
  nor ``http://prefect:4200.evil.example/api``, and no https entry allows http.

Request URLs are the pool's URL plus the operator's own path, each segment
percent-encoded (:meth:`ApiUrl.request_url`): nothing in the pool's URL or in a
name can become a query, a fragment or another host.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

API_URL_FIELD = "spec.prefect.apiUrl"
DEFAULT_PORTS = {"http": 80, "https": 443}

# RFC 3986 characters, less the apostrophe (it would need quoting in the CRD's
# CEL rule; no Prefect URL needs one).
_URL_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-._~:/?#[]@!$&()*+,;=%")
_DOT_SEGMENT = re.compile(r"/(\.|%2e){1,2}(/|$)", re.IGNORECASE)
# Percent-encoded / \ ? # . : a server or proxy that decodes them would read
# the path differently from the allowlist check.
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|3f|23|2e)", re.IGNORECASE)
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class ApiUrlRejected(ValueError):
    """A pool's API URL that the operator will not send requests to.

    ``reason`` is a condition reason (``ApiUrlInvalid`` or ``ApiUrlNotAllowed``);
    the message names the field and the rule.
    """

    def __init__(self, reason: str, rule: str) -> None:
        self.reason = reason
        self.rule = rule
        super().__init__(f"{API_URL_FIELD} {rule}")


def _invalid(rule: str) -> ApiUrlRejected:
    return ApiUrlRejected("ApiUrlInvalid", rule)


@dataclass(frozen=True)
class ApiUrl:
    """A validated Prefect API URL, split into the parts requests are built from."""

    scheme: str  # http or https
    netloc: str  # host[:port] as written (no userinfo)
    host: str  # lowercase, without IPv6 brackets
    port: int  # explicit, or the scheme's default
    path: str  # as written (still percent-encoded), no trailing slash

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path}"

    def request_url(self, *segments: str) -> str:
        """The pool's URL followed by the operator's own path segments, each encoded.

        Example:
            >>> parse_api_url("http://prefect:4200/api").request_url("work_pools", "a?b")
            'http://prefect:4200/api/work_pools/a%3Fb'
        """
        return f"{self}/" + "/".join(quote(segment, safe="") for segment in segments)


def parse_api_url(url: str) -> ApiUrl:
    """Check the form of a Prefect API URL (the CRD's CEL rules) and split it.

    Args:
        url: ``spec.prefect.apiUrl`` as written.

    Raises:
        ApiUrlRejected: reason ``ApiUrlInvalid``; the message names the rule.

    Example:
        >>> parse_api_url("https://Prefect.example:4200/api/").port
        4200
    """
    if any(c.isspace() for c in url):
        raise _invalid("must not contain whitespace")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in DEFAULT_PORTS:
        raise _invalid("must start with http:// or https://")
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        raise _invalid("must not contain userinfo (user:password@)")
    if "?" in url:
        raise _invalid("must not have a query (?)")
    if "#" in url:
        raise _invalid("must not have a fragment (#)")
    if not set(url) <= _URL_CHARACTERS:
        raise _invalid(
            "may hold only URL characters: letters, digits and -._~:/[]@!$&()*+,;=% "
            "(no backslash, quotes, control or non-ASCII characters)"
        )
    if not authority or authority.startswith(":"):
        raise _invalid("must name a host")
    if _DOT_SEGMENT.search(url):
        raise _invalid("must not have . or .. path segments")
    if _ENCODED_SEPARATOR.search(url):
        raise _invalid("must not percent-encode / \\ ? # or . (%2F %5C %3F %23 %2E)")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # a bracketed host that is no IPv6 address
        raise _invalid("must name a host: a bracketed one must be an IPv6 address") from exc
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or not parts.hostname:
        raise _invalid("must name a host and, if any, a port from 1 to 65535")
    _check_host(parts.hostname.lower())
    return ApiUrl(
        scheme=scheme,
        netloc=parts.netloc,
        host=parts.hostname.lower(),
        port=port or DEFAULT_PORTS[scheme],
        path=parts.path.rstrip("/"),
    )


def _check_host(host: str) -> None:
    """IP addresses only as themselves: a host that other spellings would turn into
    an address (``2130706433``, ``0x7f.1``, ``::ffff:a00:1``) could pass an
    allowlist or a reader as a name and reach the address; and never link-local,
    where cloud metadata services answer (``169.254.169.254``). Beyond the CRD's
    CEL rules: the operator's own check."""
    if ":" in host:  # an IPv6 literal (urlsplit checked it)
        address = ipaddress.IPv6Address(host.split("%")[0])
        if address.ipv4_mapped is not None or address.sixtofour is not None:
            raise _invalid("must write an IPv4 address as a.b.c.d, not inside an IPv6 one")
        if address.is_link_local:
            raise _invalid("must not name a link-local address (where cloud metadata answers)")
        return
    last = host.rstrip(".").rsplit(".", 1)[-1]
    if not (last.isdigit() or last.startswith("0x")):
        return  # a DNS name
    labels = host.split(".")
    canonical = len(labels) == 4 and all(
        label.isdigit() and str(int(label)) == label and int(label) <= 255 for label in labels
    )
    if not canonical:
        raise _invalid("must write an IP address as four decimal numbers a.b.c.d")
    if ipaddress.IPv4Address(host).is_link_local:
        raise _invalid("must not name a link-local address (where cloud metadata answers)")


def _within(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + "/")


ALL_NAMESPACES = "*"
ALLOWLIST_HINT = "--allowed-api-url, chart value prefect.allowedApiUrls"


@dataclass(frozen=True)
class AllowedEntry:
    """One allowlist entry: pools of ``namespace`` (``*``: of every namespace) may
    name URLs under ``prefix``."""

    namespace: str
    prefix: ApiUrl

    @classmethod
    def parse(cls, entry: str) -> AllowedEntry:
        """``[NAMESPACE=]URL``; without a namespace the entry covers every namespace.

        Raises:
            ApiUrlRejected: the URL is not itself a valid API URL.

        Example:
            >>> AllowedEntry.parse("team-a=https://prefect.team-a.svc/api").namespace
            'team-a'
        """
        namespace, sep, url = entry.partition("=")
        if not sep or "://" in namespace:
            namespace, url = ALL_NAMESPACES, entry
        if namespace != ALL_NAMESPACES and not _NAMESPACE.fullmatch(namespace):
            raise ApiUrlRejected(
                "ApiUrlInvalid", f"entry {entry!r}: {namespace!r} is neither a namespace nor *"
            )
        return cls(namespace, parse_api_url(url))

    def permits(self, namespace: str, url: ApiUrl) -> bool:
        p = self.prefix
        return (
            self.namespace in (ALL_NAMESPACES, namespace)
            and (url.scheme, url.host, url.port) == (p.scheme, p.host, p.port)
            and _within(url.path, p.path)
        )


@dataclass(frozen=True)
class AllowedApiUrls:
    """The operator's allowlist of Prefect API URLs, per namespace.

    Fails closed: with no entry nothing is allowed, unless ``allow_any`` was said
    out loud (``--allow-any-api-url``). The scheme is part of each entry, so
    plain http is allowed only where an entry names it.

    Example:
        >>> allowed = AllowedApiUrls.parse(["team-a=https://prefect.team-a.svc/api"])
        >>> allowed.permits("team-a", parse_api_url("https://prefect.team-a.svc/api"))
        True
        >>> allowed.permits("team-b", parse_api_url("https://prefect.team-a.svc/api"))
        False
        >>> allowed.permits("team-a", parse_api_url("http://prefect.team-a.svc/api"))
        False
    """

    entries: tuple[AllowedEntry, ...] = ()
    allow_any: bool = False

    @classmethod
    def parse(cls, entries: Iterable[str], allow_any: bool = False) -> AllowedApiUrls:
        """Raises ApiUrlRejected for an entry that is not itself a valid API URL."""
        return cls(tuple(AllowedEntry.parse(entry) for entry in entries), allow_any)

    def permits(self, namespace: str, url: ApiUrl) -> bool:
        return self.allow_any or any(entry.permits(namespace, url) for entry in self.entries)

    def check(self, url: str, namespace: str) -> ApiUrl:
        """The pool's URL, parsed, if the operator may send it requests.

        Args:
            url: ``spec.prefect.apiUrl``.
            namespace: the pool's namespace.

        Raises:
            ApiUrlRejected: ``ApiUrlInvalid`` for a malformed URL,
                ``ApiUrlNotAllowed`` for one outside the allowlist of the namespace.
        """
        parsed = parse_api_url(url)
        if not self.permits(namespace, parsed):
            if not self.entries:
                rule = f"is not allowed: the operator allows no API URL yet ({ALLOWLIST_HINT})"
            else:
                rule = (
                    f"is not allowed: it is under none of the API URLs the operator allows "
                    f"for namespace {namespace} ({ALLOWLIST_HINT})"
                )
            raise ApiUrlRejected("ApiUrlNotAllowed", rule)
        return parsed
