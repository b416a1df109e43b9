"""Fuzzing the two places where outside text meets the daemon (issue 8, item 3).

* The request parser: any bytes, any JSON value, any object built from the request's keys
  with any values -> a StartRequest or `RequestRejected`, never another exception.
* The filter builder: for any tag / custom-property names and values, the filters built by
  `qrs.filters` (evaluated by the simulator's QRS filter language) followed by
  `selection.select` pick exactly the tasks that carry a named tag or the exact named
  custom-property pair (case-insensitively), never another one.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from butler_mqtt.backends.qrs.filters import chunk_or, criteria_clauses
from butler_mqtt.errors import RequestRejected
from butler_mqtt.model import QrsTask, StartRequest, parse_request, validate_request
from butler_mqtt.selection import select
from butler_mqtt.sim.filter import FilterSubject, compile_filter

PARSER = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FILTERS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEYS = ["requestId", "taskId", "tag", "customProperty", "allTaskIdsMustExist", "wait", "dryRun", "then", "onFailure"]
GUID = "a8b4c123-def4-5678-9abc-def012345678"


# --------------------------------------------------------------------------- request parser


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=20)
        | st.sampled_from([GUID, GUID.upper(), f" {GUID} ", "", "stop", "continue", "x" * 300])
    )
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(KEYS + ["name", "value"]), children, max_size=4),
        max_leaves=max_leaves,
    )


VALID_NAMES = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12)
ODD_VALUES = st.sampled_from(["", "it's", "\\", "\x00", "a\nb", "x" * 256, "STOP", "nope", f" {GUID} "])
GUIDS = st.sampled_from([GUID, GUID.upper()]) | st.uuids().map(str)


def valid_requests(depth: int) -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed requests (any subset of the optional keys, at least one criterion)."""
    criteria = st.fixed_dictionaries(
        {},
        optional={
            "taskId": GUIDS | st.lists(GUIDS, max_size=3),
            "tag": VALID_NAMES | st.lists(VALID_NAMES, max_size=3),
            "customProperty": st.lists(st.fixed_dictionaries({"name": VALID_NAMES, "value": VALID_NAMES}), max_size=3),
        },
    ).filter(lambda d: any(d.values()))
    rest = st.fixed_dictionaries(
        {},
        optional={
            "requestId": st.text(max_size=128),
            "allTaskIdsMustExist": st.booleans(),
            "wait": st.booleans(),
            "dryRun": st.booleans(),
            "onFailure": st.sampled_from(["stop", "continue"]),
            **({"then": st.deferred(lambda: valid_requests(depth - 1))} if depth > 0 else {}),
        },
    )
    return st.tuples(criteria, rest).map(lambda t: {**t[0], **t[1]})


class Nested(list):  # type: ignore[type-arg]
    """Changes to apply one stage down (to `then`), not a value."""


def mutated(obj: dict[str, Any], changes: list[tuple[str, Any]], drops: list[str]) -> dict[str, Any]:
    out = dict(obj)
    for key in drops:
        out.pop(key, None)
    for key, value in changes:
        if isinstance(value, Nested):
            if isinstance(out.get("then"), dict):
                out["then"] = mutated(out["then"], value, [])
        else:
            out[key] = value
    return out


def requests_objects(depth: int = 3) -> st.SearchStrategy[dict[str, Any]]:
    """Objects built from the request's keys: valid requests with 0-2 keys dropped and 0-3
    values replaced by anything (wrong types, odd strings, unknown keys), and arbitrary
    dictionaries over the request's keys."""
    change = st.tuples(st.sampled_from(KEYS + ["colour", "requestid"]), json_values(3) | ODD_VALUES)
    nested = st.tuples(st.just("then"), st.lists(change, min_size=1, max_size=2).map(Nested))
    return st.builds(
        mutated,
        valid_requests(depth),
        st.lists(change | nested, max_size=3),
        st.lists(st.sampled_from(KEYS), max_size=2),
    ) | st.dictionaries(st.sampled_from(KEYS), json_values(3), max_size=5)


def only_rejected(call: Any, arg: Any) -> StartRequest | None:
    try:
        req = call(arg)
    except RequestRejected as rej:
        assert isinstance(rej.error, str) and rej.error and isinstance(rej.details, str)
        return None
    assert isinstance(req, StartRequest)
    assert req.taskId or req.tag or req.customProperty
    return req


@PARSER
@given(st.binary(max_size=300))
@example(b"1" * 5000)  # longer than Python's int-conversion limit (4300 digits)
@example(b'{"requestId": "r", "tag": "a", "wait": ' + b"9" * 4400 + b"}")
@example(b"[" * 100_000)
@example(b'{"tag": "a", "then": ' * 2000 + b"1" + b"}" * 2000)
@example(b"\xff\xfe{}")
@example(b'{"tag": "a\\ud800"}')  # a lone surrogate escape
def test_parse_request_on_any_bytes_only_rejects(payload: bytes) -> None:
    only_rejected(parse_request, payload)


@PARSER
@given(json_values(20))
def test_parse_request_on_any_json_value_only_rejects(value: Any) -> None:
    only_rejected(parse_request, json.dumps(value).encode())
    only_rejected(validate_request, value)


@PARSER
@given(requests_objects())
@example({"tag": "a", "then": {"tag": "b", "then": {"tag": "c"}}})
@example({"tag": "a", "requestId": 10**5000})
def test_parse_request_on_request_shaped_objects_only_rejects(obj: dict[str, Any]) -> None:
    only_rejected(validate_request, obj)
    try:
        raw = json.dumps(obj).encode()
    except ValueError:  # an int too long to print: the bytes test covers such payloads
        return
    req = only_rejected(parse_request, raw)
    if req is not None:
        assert only_rejected(validate_request, obj) == req


def test_the_generated_objects_are_sometimes_valid() -> None:
    """Guard against a strategy that only ever produces rejections (the fuzz would prove little)."""
    valid = 0

    @settings(max_examples=300, deadline=None, database=None)
    @given(requests_objects())
    def count(obj: dict[str, Any]) -> None:
        nonlocal valid
        try:
            validate_request(obj)
            valid += 1
        except RequestRejected:
            pass

    count()
    assert 30 <= valid <= 270, f"{valid} of 300 generated request objects were valid"


# --------------------------------------------------------------------------- filter builder

# Names close to each other: case variants, prefixes, quotes, backslashes, URL specials,
# and the words of QRS's filter language, so a wrongly built filter would pick a neighbour.
SEEDS = ["a", "A", "ab", "a b", "it's", "it\\'s", "\\", "'", "''", "R&D #1 +50%", "x eq 'y'", "or", "(", "straße", "STRASSE", "é", "Ab"]
names = st.sampled_from(SEEDS) | st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=8)


@st.composite
def repository(draw: Any) -> tuple[list[dict[str, Any]], StartRequest, int]:
    """Task documents (QRS ReloadTask shape), a request naming some of their tags and
    properties (and some names nobody has), and a filter length limit."""
    pool_tags = draw(st.lists(names, min_size=1, max_size=8))
    pool_pairs = draw(st.lists(st.tuples(names, names), min_size=1, max_size=6))
    docs = []
    for i in range(draw(st.integers(1, 12))):
        tags = draw(st.lists(st.sampled_from(pool_tags), max_size=3))
        props = draw(st.lists(st.sampled_from(pool_pairs), max_size=3))
        # QRS's pitfall: the name of one property with the value of another.
        if len(props) >= 2 and draw(st.booleans()):
            props = [(props[0][0], props[1][1])] + props[1:]
        docs.append(
            {
                "id": str(uuid.UUID(int=i + 1, version=4)),
                "name": f"Task {i}",
                "tags": [{"id": str(uuid.uuid4()), "name": t} for t in tags],
                "customProperties": [{"value": v, "definition": {"name": n}} for n, v in props],
            }
        )
    want_tags = draw(st.lists(st.sampled_from(pool_tags) | names, min_size=0, max_size=5))
    want_pairs = draw(st.lists(st.sampled_from(pool_pairs) | st.tuples(names, names), max_size=4))
    # Mixed pairs: a name from one pair with the value of another (only the exact pair may match).
    if len(pool_pairs) >= 2 and draw(st.booleans()):
        want_pairs.append((pool_pairs[0][0], pool_pairs[1][1]))
    want_ids = draw(st.lists(st.sampled_from([d["id"] for d in docs] + [str(uuid.uuid4())]), max_size=2))
    if not (want_tags or want_pairs or want_ids):
        want_tags = [pool_tags[0]]
    req = StartRequest(
        taskId=want_ids, tag=want_tags, customProperty=[{"name": n, "value": v} for n, v in want_pairs]
    )
    limit = draw(st.sampled_from([200, 400, 6000]))
    return docs, req, limit


def fold(s: str) -> str:
    return s.casefold()


def expected_ids(docs: list[dict[str, Any]], req: StartRequest) -> set[str]:
    """Independent statement of the contract: the tasks carrying a named tag, the exact
    named custom-property pair, or a named ID."""
    tags = {fold(t) for t in req.tag}
    pairs = {(fold(c.name), fold(c.value)) for c in req.customProperty}
    out = set()
    for d in docs:
        if d["id"] in req.taskId:
            out.add(d["id"])
        if any(fold(t["name"]) in tags for t in d["tags"]):
            out.add(d["id"])
        if any((fold(cp["definition"]["name"]), fold(cp["value"])) in pairs for cp in d["customProperties"]):
            out.add(d["id"])
    return out


@FILTERS
@given(repository())
def test_built_filters_plus_selection_pick_exactly_the_named_tasks(case: tuple[list[dict[str, Any]], StartRequest, int]) -> None:
    docs, req, limit = case
    returned: dict[str, dict[str, Any]] = {}
    chunks = list(chunk_or(criteria_clauses(req), limit))
    assert chunks, "no filter for a request with criteria"
    for expr in chunks:
        flt = compile_filter(expr)  # a FilterError here is a filter QRS would answer 400 to
        for d in docs:
            if flt.matches(FilterSubject(d)):
                returned[d["id"]] = d
    want = expected_ids(docs, req)
    # QRS must return every named task (selection can only narrow it down) ...
    assert want <= set(returned), f"the filter missed {want - set(returned)}: {chunks}"
    # ... and after selection exactly those start, each with the criteria that name it.
    selection = select(req, [QrsTask.from_qrs(d) for d in returned.values()])
    assert set(selection.task_ids) == want
    assert len(selection.task_ids) == len(want)
    for s in selection.selected:
        assert s.matched_by


@FILTERS
@given(names, names, names)
def test_custom_property_pitfall_never_selects_the_mixed_task(name: str, value: str, other: str) -> None:
    """QRS matches a property's name and value clause by clause; the selection re-check must
    drop a task whose `name` property has another value and whose other property has `value`."""
    if fold(value) == fold(other):
        return
    doc = {
        "id": str(uuid.UUID(int=1, version=4)),
        "name": "mixed",
        "tags": [],
        "customProperties": [
            {"value": other, "definition": {"name": name}},
            {"value": value, "definition": {"name": name + "-2"}},
        ],
    }
    req = StartRequest(customProperty=[{"name": name, "value": value}])
    (expr,) = chunk_or(criteria_clauses(req), 6000)
    qrs_returned = compile_filter(expr).matches(FilterSubject(doc))
    assert qrs_returned  # the pitfall is real in the simulator too ...
    assert select(req, [QrsTask.from_qrs(doc)]).selected == []  # ... and never reaches a start


@pytest.mark.parametrize("limit", [200, 6000])
def test_chunked_filters_cover_forty_criteria(limit: int) -> None:
    docs = [
        {"id": str(uuid.UUID(int=i + 1, version=4)), "name": f"T{i}", "tags": [{"name": f"tag {i} & 'q'"}], "customProperties": []}
        for i in range(40)
    ]
    req = StartRequest(tag=[f"tag {i} & 'q'" for i in range(40)])
    chunks = list(chunk_or(criteria_clauses(req), limit))
    assert (len(chunks) > 1) == (limit == 200)
    hits = {d["id"] for expr in chunks for d in docs if compile_filter(expr).matches(FilterSubject(d))}
    assert hits == {d["id"] for d in docs}
