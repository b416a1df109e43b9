"""Request parsing: every bad input gets a clear RequestRejected, valid input a StartRequest."""

import json

import pytest

from butler_mqtt.errors import RequestRejected
from butler_mqtt.model import MAX_PAYLOAD_BYTES, parse_plain, parse_request

GUID = "a8b4c123-def4-5678-9abc-def012345678"


def rejected(payload: bytes) -> RequestRejected:
    with pytest.raises(RequestRejected) as info:
        parse_request(payload)
    return info.value


def test_string_or_list_accepted_and_ids_normalised():
    req = parse_request(json.dumps({"taskId": GUID.upper(), "tag": "a", "requestId": "r1"}).encode())
    assert req.taskId == [GUID]
    assert req.tag == ["a"]
    assert req.requestId == "r1"


def test_full_request_with_chain():
    req = parse_request(
        json.dumps(
            {
                "tag": ["x"],
                "customProperty": [{"name": "taskGroup", "value": "finance"}],
                "then": {"tag": "y", "then": {"taskId": [GUID]}},
                "onFailure": "continue",
            }
        ).encode()
    )
    assert req.then is not None and req.then.then is not None
    assert req.waits and req.chain_depth() == 3


def test_invalid_guid_gives_the_contract_error():
    err = rejected(b'{"taskId": ["not-a-guid"]}')
    assert (err.error, err.details) == ("Invalid task ID format", "Task ID must be a valid GUID")


def test_invalid_guid_in_chain_is_also_rejected():
    err = rejected(json.dumps({"tag": "a", "then": {"taskId": "123"}}).encode())
    assert err.error == "Invalid task ID format"


@pytest.mark.parametrize(
    "payload, error, fragment",
    [
        (b"{not json", "Invalid JSON", "line 1"),
        (b"\xff\xfe{}", "Invalid payload", "UTF-8"),
        (b"[]", "Invalid request", "JSON object"),
        (b'"abc"', "Invalid request", "JSON object"),
        (b"{}", "Invalid request", "at least one of"),
        (b'{"tag": "a", "foo": 1}', "Invalid request", "unknown field 'foo'"),
        (b'{"tag": 5}', "Invalid request", "tag"),
        (b'{"tag": ["a", 5]}', "Invalid request", "tag.1"),
        (b'{"tag": "a", "dryRun": "true"}', "Invalid request", "dryRun"),
        (b'{"tag": "a", "wait": 1}', "Invalid request", "wait"),
        (b'{"tag": ""}', "Invalid request", "empty"),
        (b'{"tag": "a\\nb"}', "Invalid request", "control character"),
        (b'{"customProperty": [{"name": "a"}]}', "Invalid request", "value"),
        (b'{"customProperty": [{"name": "a", "value": "b", "x": 1}]}', "Invalid request", "unknown field"),
        (b'{"tag": "a", "onFailure": "explode"}', "Invalid request", "onFailure"),
        (b'{"tag": "a", "requestId": 12}', "Invalid request", "requestId"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_reason(payload, error, fragment):
    err = rejected(payload)
    assert err.error == error
    assert fragment in err.details


def test_oversize_payload_rejected_before_parsing():
    err = rejected(b'{"tag": "' + b"a" * (2 * 1024 * 1024) + b'"}')
    assert err.error == "Payload too large"
    assert str(MAX_PAYLOAD_BYTES) in err.details


def test_deep_nesting_is_rejected_not_crashing():
    deep = b'{"tag": "a", "then": ' * 50 + b'{"tag": "b"}' + b"}" * 50
    assert rejected(deep).error == "Invalid request"
    assert rejected(b"[" * 60000).error in ("Invalid JSON", "Invalid request")


def test_quotes_and_filter_syntax_in_names_are_accepted_verbatim():
    name = "it's & #1 + 100% (or) 'x' eq 'y' \\ ünïcode"
    req = parse_request(json.dumps({"tag": name}).encode())
    assert req.tag == [name]


def test_plain_topic_payload():
    assert parse_plain(f"  {GUID}\n".encode()).taskId == [GUID]
    with pytest.raises(RequestRejected):
        parse_plain(b"nope")
    with pytest.raises(RequestRejected):
        parse_plain(b"\xff")


def test_malformed_qrs_collections_select_less_never_crash():
    from butler_mqtt.model import QrsTask

    t = QrsTask.from_qrs({
        "id": "11111111-1111-4111-8111-111111111111", "name": 7, "enabled": "yes",
        "tags": "finance", "customProperties": [None, {"definition": None, "value": "x"},
                                                 {"definition": {"name": "group"}, "value": 3},
                                                 {"definition": {"name": "group"}, "value": "ok"}],
    })
    assert t.tags == () and t.custom_properties == (("group", "ok"),) and t.name == "" and t.enabled is True
    assert QrsTask.from_qrs({"id": "11111111-1111-4111-8111-111111111111", "tags": [None, {"name": "a"}]}).tags == ("a",)


def test_correlation_key_includes_the_response_topic_and_bounds_its_length():
    from butler_mqtt import keys

    assert keys.for_correlation(b"job-1", "a/replies") != keys.for_correlation(b"job-1", "b/replies")
    assert len(keys.for_correlation(b"x" * 65000, "a")) < 100


def test_every_reply_envelope_starts_with_event_and_request_id():
    from butler_mqtt import replies
    from butler_mqtt.model import TaskOutcome

    o = TaskOutcome("t", "T", "started", ["tag:a"], execution_id="e")
    built = [
        replies.task(o, "r", 1), replies.summary("r", [o], [], 0), replies.error("r", "E", "D"),
        replies.task_finished("r", "t", "T", "e", "FinishedSuccess", {"startTime": replies.QRS_NEVER, "duration": 5}),
        replies.request_finished("r", {"FinishedSuccess": 1}, None, 10, None),
    ]
    assert [list(ev)[:2] for ev in built] == [["event", "requestId"]] * 5
    assert built[0]["stage"] == 1 and built[1]["stage"] == 0 and built[3]["startTime"] is None and built[3]["durationMs"] == 5
