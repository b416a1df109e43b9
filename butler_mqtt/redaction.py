"""What may be shown of a URL that can hold credentials (pure).

A webhook or journal URL can carry a password (`user:pw@`), a token in its query
(`?token=...`, libpq's `?password=...`) or a secret in its path (Slack's and Teams' webhooks
are addressed by a secret path). `redact_url` keeps what an operator needs to recognise the
URL (scheme, host, port, the names of the query parameters) and nothing else; `url_problem`
says what is wrong with one in those words only.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

HIDDEN = "***"
MIN_TOKEN_SEGMENT = 12


def _netloc_host(netloc: str) -> str:
    """The host[:port] part of a netloc, without userinfo (urllib keeps the last '@')."""
    return netloc.rpartition("@")[2]


def redact_url(url: str) -> str:
    """`https://***@hooks.example:8443/***?token=***`: scheme, host, port and query names only."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:  # e.g. an unbalanced '[' in the host
        return f"{HIDDEN} (not a URL)"
    if not parts.scheme or not parts.netloc:
        return f"{HIDDEN} (not a URL)"
    hostport = _netloc_host(parts.netloc)
    text = f"{parts.scheme}://{HIDDEN + '@' if '@' in parts.netloc else ''}{hostport}"
    if parts.path not in ("", "/"):
        text += f"/{HIDDEN}"
    if parts.query:
        names = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)] or [HIDDEN]
        text += "?" + "&".join(f"{name}={HIDDEN}" for name in names)
    return text


def url_problem(url: str, schemes: tuple[str, ...], *, host_required: bool = True) -> str | None:
    """None for a usable URL of one of `schemes`, else what is wrong with it (never the URL's
    userinfo, path or query: the caller adds `redact_url(url)` if it wants to show it).
    `host_required=False`: libpq's URLs may name no host (a local socket) or several."""
    if any(c.isspace() or not c.isprintable() for c in url):
        return "contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        hosts = _netloc_host(parts.netloc).split(",")
        ports = [urlsplit(f"//{h}").port for h in hosts]  # ValueError for a port outside 0..65535
    except ValueError as exc:
        if "port" in str(exc).lower():
            return "the port is not a number from 1 to 65535"
        return "is not a valid URL"
    if parts.scheme.lower() not in schemes or not url.lower().startswith(tuple(s + "://" for s in schemes)):
        return f"expected a {' or '.join(s + '://' for s in schemes)} URL"
    if host_required and not parts.hostname:
        return "has no host"
    if 0 in ports:
        return "the port is not a number from 1 to 65535"
    return None


def url_secrets(url: str) -> list[str]:
    """The parts of `url` that may be secret, for the log scrubber: the URL itself, its
    password, its path (webhooks addressed by a secret path) and its query values."""
    found = [url]
    try:
        parts = urlsplit(url)
        found.append(parts.password or "")
        if parts.username and parts.password:  # user:password, as it stands in the URL
            found.append(parts.netloc.rsplit("@", 1)[0])
    except ValueError:
        return found
    if parts.path not in ("", "/"):
        # The path, and each segment long enough to be a token (Slack's and Teams' webhook
        # secrets are 24+ characters; "services" or "hooks" are not worth hiding everywhere).
        found += [parts.path, *(seg for seg in parts.path.split("/") if len(seg) >= MIN_TOKEN_SEGMENT)]
    found += [value for _, value in parse_qsl(parts.query, keep_blank_values=True)]
    return [f for f in found if f]
