"""The idempotency key of a request: one spelling for every ingress (MQTT JSON, MQTT plain,
REST), so "the same requestId over REST and MQTT starts once" cannot break silently.

* `requestId` -> `id:<requestId>`, whatever the ingress;
* MQTT 5 correlation data without requestId -> `cd:<response topic digest>:<hex>`: two clients
  that happen to use the same correlation data on different response topics are two requests;
* neither -> an anonymous key, new for every delivery. A broker's redelivery of the same
  delivery is recognised by its fingerprint (`delivery_fingerprint`), never by payload alone,
  so tomorrow's identical trigger is a new request.
"""

from __future__ import annotations

import hashlib
import uuid


def for_request_id(request_id: str) -> str:
    return f"id:{request_id}"


def for_correlation(correlation: bytes, response_topic: str) -> str:
    topic = hashlib.sha256(response_topic.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    # Correlation data may be up to 64 KiB: long values are keyed by their digest.
    value = correlation.hex() if len(correlation) <= 64 else "h" + hashlib.sha256(correlation).hexdigest()
    return f"cd:{topic}:{value}"


def anonymous(ingress: str) -> str:
    return f"anon:{ingress}:{uuid.uuid4()}"


def delivery_fingerprint(payload: bytes, topic: str, mid: int) -> str:
    """Payload, topic and packet id: what a broker's redelivery of one delivery shares with it.

    Only a redelivery (MQTT dup flag) is matched against it: a packet id is reused by the
    broker for other messages, so a fresh delivery never is.
    """
    h = hashlib.sha256(payload)
    h.update(b"\0" + topic.encode("utf-8", "surrogatepass") + b"\0" + str(mid).encode())
    return h.hexdigest()


def for_caller(key: str, caller: str | None) -> str:
    """A request key scoped to its caller (contract section 10): the same requestId from two
    callers is two requests. The anonymous caller (None) keeps the key as it was, so journals
    written before callers keep suppressing duplicates. Caller names are [a-z0-9_-]: the `:`
    after the name cannot be part of it."""
    return key if caller is None else f"caller:{caller}:{key}"


def caller_of(key: str) -> str | None:
    """The caller a request key is scoped to (`for_caller`), None for the anonymous caller."""
    if not key.startswith("caller:"):
        return None
    name, sep, _rest = key[len("caller:") :].partition(":")
    return name if sep and name else None
