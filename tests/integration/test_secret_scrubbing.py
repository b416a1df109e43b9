"""Issue 20, class 9 (secrets by value): a REST token, the MQTT password or a webhook URL's
credentials sent back to the daemon as a requestId, a tag or inside a bad request never reach a
log line, in whatever field; the publisher's own replies are unchanged. Through a real broker
and the simulator over mTLS."""

from __future__ import annotations

import io
import json
import logging
import queue
import uuid
from typing import Any

import requests
import structlog

from butler_mqtt.mqtt.requester import Requester
from butler_mqtt.ops.logging import REDACTED, scrub_secrets, setup_logging
from butler_mqtt.sim import SimTask
from tests.conftest import make_config

TASK = "d0000020-0000-4000-8000-000000000009"
TASKS = [SimTask(TASK, "Scrubbed", run_seconds=0.05)]
TOKEN = f"rest-token-{uuid.uuid4().hex}"
HOOK_PASSWORD = f"hook-pw-{uuid.uuid4().hex[:12]}"
HOOK_PATH_SECRET = f"T0{uuid.uuid4().hex[:20]}"
HOOK_QUERY_TOKEN = f"qtok{uuid.uuid4().hex[:12]}"
SECRETS = (TOKEN, HOOK_PASSWORD, HOOK_PATH_SECRET, HOOK_QUERY_TOKEN)


def _events(box: queue.Queue[dict[str, Any]], until: str) -> list[dict[str, Any]]:
    got = [box.get(timeout=30)]
    while got[-1].get("event") not in (until, "error"):
        got.append(box.get(timeout=30))
    return got


def test_configured_secrets_are_scrubbed_by_value_from_every_log_line(qrs_certs, sim, broker, tmp_path, start_daemon, _log_stream):
    hook = f"https://butler:{HOOK_PASSWORD}@127.0.0.1:9/services/{HOOK_PATH_SECRET}?token={HOOK_QUERY_TOKEN}"
    cfg = make_config(qrs_certs, sim.port, broker, tmp_path / "state", http={"enabled": True, "port": 0, "token": TOKEN},
                      alerts={"webhook": {"url": hook}})
    d = start_daemon(cfg)
    captured = io.StringIO()
    _log_stream.current = captured  # every line the daemon logs from here (restored by conftest)
    with Requester(cfg.mqtt) as r:
        _, box = r.send({"requestId": TOKEN, "taskId": TASK})  # the token as a requestId: the audit line
        replies = _events(box, "summary")
        assert replies[-1]["event"] == "summary" and replies[-1]["requestId"] == TOKEN  # the publisher's own value
        _, box = r.send({"requestId": f"x-{HOOK_PASSWORD}", "tag": [f"tag {HOOK_PATH_SECRET}"]})  # inside other fields
        assert _events(box, "summary")[-1]["event"] == "summary"
        _, box = r.send({"requestId": f"bad-{HOOK_QUERY_TOKEN}", "taskId": TASK, "no such field": TOKEN})
        assert _events(box, "error")[-1]["event"] == "error"
    base = f"http://127.0.0.1:{d.daemon.http_server.port}"
    answer = requests.post(f"{base}/v4/reloadtask/{TASK}/start", json={"requestId": f"r-{TOKEN}"},
                           headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert answer.status_code == 200
    refused = requests.post(f"{base}/v4/reloadtask/{TASK}/start", headers={"Authorization": f"Bearer x{TOKEN}"}, timeout=30)
    assert refused.status_code == 401
    d.stop()
    logged = captured.getvalue()
    assert "audit" in logged and REDACTED in logged  # the lines were written, with the values replaced
    for secret in SECRETS:
        assert secret not in logged


def test_the_scrubber_covers_exception_texts_and_stdlib_lines():
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    secret = f"s3cret-{uuid.uuid4().hex}"
    try:
        setup_logging("info", "json", out)
        scrub_secrets([secret])
        log = structlog.get_logger("t")
        try:
            raise RuntimeError(f"connect to https://u:{secret}@host failed")
        except RuntimeError as exc:
            log.exception("boom", detail={"nested": [f"a {secret} b"]}, error=exc)
        logging.getLogger("uvicorn.error").error("bad %s", secret, exc_info=ValueError(secret))
    finally:
        scrub_secrets([])
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        structlog.reset_defaults()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2 and secret not in out.getvalue()
    assert "RuntimeError" in lines[0]["exception"] and REDACTED in lines[0]["exception"]
    assert lines[0]["detail"] == {"nested": [f"a {REDACTED} b"]}
