"""Which response topics a request may name (pure).

A reply must never go to a topic that cannot be published to (wildcards, empty, too long), that
the broker reserves (`$SYS/...`), or that the daemon itself listens on or publishes its status
to (a loop, or a forged status). `mqtt.response_topic_prefixes`, when set, is an allow-list.
"""

from __future__ import annotations

from collections.abc import Sequence

from paho.mqtt.client import topic_matches_sub

from butler_mqtt.config import MqttConfig

#: Longer response topics are refused (MQTT allows 65,535 bytes; no real one comes near this).
MAX_TOPIC_BYTES = 1024


def response_topic_problem(topic: str, cfg: MqttConfig, listening: Sequence[str] = ()) -> str | None:
    """None when replies may be published to `topic`, else why not (for the error reply).
    `listening`: further filters the daemon subscribes to (the caller topics,
    `<topics.start>/+` and `<topics.stop>/+`): a reply there would be taken as a request. Only
    topics.reply, which the daemon ignores there, is exempt."""
    if not topic:
        return "the response topic is empty"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "the response topic is not valid UTF-8"
    if size > MAX_TOPIC_BYTES:
        return f"the response topic is longer than {MAX_TOPIC_BYTES} bytes"
    if "+" in topic or "#" in topic:
        return "the response topic contains a wildcard (+ or #)"
    if "\x00" in topic:
        return "the response topic contains a NUL character"
    if topic.startswith("$"):
        return "the response topic starts with '$' (reserved by the broker)"
    own = [cfg.topics.start, cfg.topics.start_plain, cfg.topics.stop, cfg.topics.status]
    for sub in (t for t in own if t):
        if topic == sub or topic_matches_sub(sub, topic) or topic.startswith(cfg.topics.status + "/"):
            return f"the response topic is one of the daemon's own topics ({sub})"
    for sub in listening:
        if topic_matches_sub(sub, topic) and topic != cfg.topics.reply:
            return f"the response topic is one the daemon listens on for callers ({sub})"
    prefixes = cfg.response_topic_prefixes
    if prefixes is not None and not any(topic.startswith(p) for p in prefixes):
        return "the response topic is not under mqtt.response_topic_prefixes (" + ", ".join(prefixes) + ")"
    return None
