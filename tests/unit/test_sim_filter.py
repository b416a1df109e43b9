"""The simulator's QRS filter language: syntax, errors and QRS's evaluation quirks."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from butler_mqtt.sim import generate_tasks
from butler_mqtt.sim.filter import FilterError, FilterSubject, compile_filter, compile_orderby
from butler_mqtt.sim.store import Store

GUID_A = "0a6b1a3e-43ce-4a4f-9d44-3a8c6d1e2f01"
GUID_B = "7C1D2E3F-4A5B-4C6D-8E9F-0A1B2C3D4E5F"


def task(
    name: str,
    *,
    id: str = GUID_A,
    tags: tuple[str, ...] = (),
    props: tuple[tuple[str, str], ...] = (),
    status: int = 0,
    enabled: bool = True,
    stream: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ReloadTask-shaped document with only what the filters here need."""
    return {
        "id": id,
        "name": name,
        "enabled": enabled,
        "createdDate": "2024-03-02T10:00:00.000Z",
        "tags": [{"id": GUID_B, "name": t, "privileges": None} for t in tags],
        "customProperties": [
            {"value": value, "definition": {"name": definition}} for definition, value in props
        ],
        "app": {"name": name + " app", "stream": stream},
        "operational": {"lastExecutionResult": {"status": status}},
    }


def matches(expr: str, doc: dict[str, Any]) -> bool:
    return compile_filter(expr).matches(FilterSubject(doc))


def select(expr: str, docs: list[dict[str, Any]]) -> list[str]:
    flt = compile_filter(expr)
    return [d["name"] for d in docs if flt.matches(FilterSubject(d))]


DOCS = [
    task("Alpha", tags=("a", "shared"), status=7),
    task("Beta", tags=("b", "shared"), status=8),
    task("Gamma", tags=("c",), status=1, enabled=False),
]


# --- operators -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("name eq 'Beta'", ["Beta"]),
        ("name ne 'Beta'", ["Alpha", "Gamma"]),
        ("name sw 'al'", ["Alpha"]),
        ("name ew 'MA'", ["Gamma"]),
        ("name so 'et'", ["Beta"]),
        ("operational.lastExecutionResult.status eq 8", ["Beta"]),
        ("operational.lastExecutionResult.status ne 8", ["Alpha", "Gamma"]),
        ("operational.lastExecutionResult.status gt 7", ["Beta"]),
        ("operational.lastExecutionResult.status ge 7", ["Alpha", "Beta"]),
        ("operational.lastExecutionResult.status lt 7", ["Gamma"]),
        ("operational.lastExecutionResult.status le 7", ["Alpha", "Gamma"]),
        ("enabled eq false", ["Gamma"]),
        ("enabled eq true", ["Alpha", "Beta"]),
        ("name gt 'b'", ["Beta", "Gamma"]),
    ],
)
def test_operators(expr: str, expected: list[str]) -> None:
    assert select(expr, DOCS) == expected


def test_and_binds_tighter_than_or() -> None:
    # a and b or c == (a and b) or c
    assert select("name eq 'Alpha' and enabled eq false or name eq 'Beta'", DOCS) == ["Beta"]
    assert select("name eq 'Beta' or name eq 'Alpha' and enabled eq false", DOCS) == ["Beta"]
    assert select("(name eq 'Alpha' or name eq 'Gamma') and enabled eq false", DOCS) == ["Gamma"]
    assert select("name eq 'Alpha' or (name eq 'Gamma' and enabled eq true)", DOCS) == ["Alpha"]


def test_parentheses_nest_and_single_clause_groups_parse() -> None:
    assert select("(name eq 'Alpha')", DOCS) == ["Alpha"]
    assert select("((name eq 'Alpha') or ((name eq 'Beta')))", DOCS) == ["Alpha", "Beta"]


def test_keywords_any_case() -> None:
    assert select("name EQ 'Alpha' OR name Eq 'Beta'", DOCS) == ["Alpha", "Beta"]


# --- literals ----------------------------------------------------------------------------------


def test_backslash_escapes_quote_and_backslash() -> None:
    assert matches(r"name eq 'Q1\'25'", task("Q1'25"))
    assert matches(r"name eq 'a\\b'", task("a\\b"))
    assert matches(r"name eq 'end\\'", task("end\\"))
    assert not matches(r"name eq 'a\\b'", task("a\\\\b"))


def test_empty_literal_is_the_empty_string() -> None:
    assert matches("name eq ''", task(""))
    assert not matches("name eq ''", task("x"))


@pytest.mark.parametrize(
    "expr",
    [
        "name eq 'Q1''25'",  # SQL/OData doubling is not QRS syntax
        'name eq "Alpha"',  # double quotes are not either
        "not name eq 'Alpha'",
        "name eq 'Alpha' and not enabled eq true",
        "name eq 'unterminated",
        "name eq 'trailing backslash\\",
        "name eq",
        "name 'Alpha'",
        "name like 'Alpha'",
        "name eq Alpha",  # bare words other than GUID/int/bool/null
        "name eq 'Alpha' and",
        "name eq 'Alpha' or or name eq 'Beta'",
        "(name eq 'Alpha'",
        "name eq 'Alpha')",
        "name.  eq 'x'",
        "name eq 'a' 'b'",
    ],
)
def test_unparsable_filters_give_qrs_text(expr: str) -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter(expr)
    assert str(caught.value) == f"Cannot parse the expression: {expr}"


@pytest.mark.parametrize("expr", ["()", "name eq 'x' and ()", "(( ))"])
def test_empty_group_is_invalid_expression(expr: str) -> None:
    with pytest.raises(FilterError, match=r"^Invalid expression$"):
        compile_filter(expr)


def test_guids_unquoted_and_case_insensitive() -> None:
    doc = task("Alpha", id=GUID_A)
    assert matches(f"id eq {GUID_A.upper()}", doc)
    assert matches(f"id eq {GUID_A}", doc)
    assert matches(f"id ne {GUID_B}", doc)
    assert matches(f"tags.id eq {GUID_B.lower()}", task("x", tags=("t",)))


def test_null_literal() -> None:
    assert matches("app.stream eq null", task("x"))
    assert matches("app.stream.name eq null", task("x"))  # null on the way reads as null
    streamed = task("x", stream={"id": GUID_B, "name": "Finance"})
    assert matches("app.stream.name eq 'finance'", streamed)
    assert matches("app.stream ne null", streamed)


def test_date_literals_compare_as_instants() -> None:
    doc = task("x")  # created 2024-03-02T10:00:00.000Z
    assert matches("createdDate ge '2024-03-02 09:00:00'", doc)
    assert matches("createdDate lt '2024-03-02T10:00:01.000Z'", doc)
    assert matches("createdDate eq '2024-03-02T10:00:00Z'", doc)
    assert not matches("createdDate gt '2024-03-02T10:00:00.000Z'", doc)


# --- case-insensitivity and collections --------------------------------------------------------


def test_property_names_and_strings_are_case_insensitive() -> None:
    doc = task("Sales Dashboard", tags=("Finance",))
    assert matches("NAME eq 'sales dashboard'", doc)
    assert matches("Tags.Name eq 'FINANCE'", doc)
    assert matches("tags.name so 'NAN'", doc)
    result = {"executionID": GUID_A, "taskID": GUID_B}
    for spelled in ("executionID", "executionid", "ExecutionId", "EXECUTIONID"):
        assert matches(f"{spelled} eq {GUID_A}", result)


def test_collections_match_when_any_element_matches() -> None:
    assert select("tags.name eq 'shared'", DOCS) == ["Alpha", "Beta"]
    assert select("tags.name eq 'b'", DOCS) == ["Beta"]
    assert select("tags.name ne 'a'", DOCS) == ["Alpha", "Beta", "Gamma"]  # any *other* tag
    assert select("tags.name eq 'a'", [task("no tags")]) == []
    definition = {"name": "taskGroup", "objectTypes": ["App", "ReloadTask"]}
    assert matches("objectTypes eq 'reloadtask'", definition)
    assert not matches("objectTypes eq 'Stream'", definition)


def test_custom_property_pair_is_not_correlated() -> None:
    """Each clause matches on its own: A=x plus B=y satisfies 'A and value y' (the pitfall)."""
    pitfall = task("pitfall", props=(("A", "x"), ("B", "y")))
    honest = task("honest", props=(("A", "y"),))
    other = task("other", props=(("B", "x"),))
    expr = "customProperties.definition.name eq 'A' and customProperties.value eq 'y'"
    assert select(expr, [pitfall, honest, other]) == ["pitfall", "honest"]


def test_unknown_property_matches_nothing() -> None:
    assert select("nosuchthing eq 'x'", DOCS) == []
    assert select("nosuchthing ne 'x'", DOCS) == []


def test_type_mismatch_does_not_match() -> None:
    assert select("name eq 5", DOCS) == []
    assert select("operational.lastExecutionResult.status eq '7'", DOCS) == []
    assert select("enabled eq 1", DOCS) == []


# --- index hint and ordering -------------------------------------------------------------------


def test_guid_lookup_recognises_or_chains_of_one_path() -> None:
    flt = compile_filter(f"executionID eq {GUID_A} or (ExecutionId eq {GUID_B})")
    assert flt.guid_lookup == ("executionid", frozenset({GUID_A, GUID_B.lower()}))
    assert compile_filter(f"id eq {GUID_A}").guid_lookup == ("id", frozenset({GUID_A}))
    assert compile_filter(f"id eq {GUID_A} or taskID eq {GUID_B}").guid_lookup is None
    assert compile_filter(f"id eq {GUID_A} and id eq {GUID_A}").guid_lookup is None
    assert compile_filter(f"id ne {GUID_A}").guid_lookup is None
    assert compile_filter("id eq 'not-a-guid'").guid_lookup is None


def test_orderby() -> None:
    docs = [task("b", status=2), task("A", status=2), task("c", status=1)]
    key = compile_orderby("operational.lastExecutionResult.status desc, Name")
    assert key is not None
    assert [d["name"] for d in sorted(docs, key=lambda d: key(FilterSubject(d)))] == [
        "A",
        "b",
        "c",
    ]
    assert compile_orderby(" ") is None
    for bad in ("name sideways", "name asc desc", "na-me"):
        with pytest.raises(FilterError):
            compile_orderby(bad)


# --- properties --------------------------------------------------------------------------------

TAG_POOL = ["alpha", "Beta", "it's", "a\\b", "R&D #1 +50%", "", " ", "ß", "SS"]


def escape(value: str) -> str:
    """How a client must quote a value: backslash first, then the quote."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


@settings(max_examples=300, deadline=None)
@given(
    name=st.text(max_size=30),
    assignment=st.lists(st.lists(st.sampled_from(TAG_POOL), max_size=3), min_size=1, max_size=8),
    carriers=st.sets(st.integers(min_value=0, max_value=7)),
)
def test_escaped_tag_name_selects_exactly_its_tasks(
    name: str, assignment: list[list[str]], carriers: set[int]
) -> None:
    docs = []
    for index, tags in enumerate(assignment):
        if index in carriers:
            tags = [*tags, name]
        docs.append(task(f"t{index}", tags=tuple(tags)))
    expected = [
        d["name"] for d in docs if any(t["name"].casefold() == name.casefold() for t in d["tags"])
    ]
    assert select(f"tags.name eq '{escape(name)}'", docs) == expected
    assert select(f"(Tags.Name eq '{escape(name)}')", docs) == expected


def test_twenty_thousand_tasks_filter_exactly() -> None:
    # Speed is measured in bench/ (never asserted on time here: CI machines are shared).
    tasks = generate_tasks(20_000, seed=7)
    store = Store(tasks)
    expr = f"id eq {tasks[123].id} or tags.name eq 'tag-042'"
    flt = compile_filter(expr)
    store.count("reloadtask", flt)  # first use renders and caches every task
    count = store.count("reloadtask", flt)
    expected = sum(
        1 for t in tasks if t.task_type == 0 and (t.id == tasks[123].id or "tag-042" in t.tags)
    )
    assert count == expected > 1
