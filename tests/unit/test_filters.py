"""Filter building: escaping, one OR-ed filter per request, chunking by encoded length."""

from urllib.parse import quote_plus

from hypothesis import given
from hypothesis import strategies as st

from butler_mqtt.backends.qrs.filters import chunk_or, criteria_clauses, escape, literal
from butler_mqtt.model import StartRequest

GUID = "a8b4c123-def4-5678-9abc-def012345678"


def test_escape_backslash_first_then_quote():
    assert escape("it's") == "it\\'s"
    assert escape("a\\b") == "a\\\\b"
    assert escape("\\'") == "\\\\\\'"
    assert literal("x") == "'x'"


def test_clauses_for_all_criteria_kinds():
    req = StartRequest(taskId=[GUID], tag=["a", "b"], customProperty=[{"name": "n", "value": "v"}])
    assert criteria_clauses(req) == [
        f"id eq {GUID}",
        "tags.name eq 'a'",
        "tags.name eq 'b'",
        "(customProperties.definition.name eq 'n' and customProperties.value eq 'v')",
    ]


def test_duplicate_criteria_give_one_clause():
    req = StartRequest(tag=["a", "a"], taskId=[GUID, GUID.upper()])
    assert len(criteria_clauses(req)) == 2


def test_chunking_respects_the_encoded_limit_and_keeps_every_clause():
    clauses = [f"tags.name eq 'tag number {i} & more'" for i in range(100)]
    chunks = list(chunk_or(clauses, 600))
    assert len(chunks) > 1
    assert all(len(quote_plus(c, safe="")) <= 600 for c in chunks)
    assert [c for ch in chunks for c in ch.split(" or ")] == clauses


def test_small_request_is_one_filter():
    assert len(list(chunk_or(["a", "b", "c"], 6000))) == 1


def _unescape_literal(lit: str) -> str:
    assert lit[0] == lit[-1] == "'"
    out, i, body = [], 0, lit[1:-1]
    while i < len(body):
        if body[i] == "\\":
            out.append(body[i + 1])
            i += 2
        else:
            assert body[i] != "'", "an unescaped quote would end the literal early"
            out.append(body[i])
            i += 1
    return "".join(out)


@given(st.text(min_size=1, max_size=60))
def test_escaping_round_trips_any_text(value):
    assert _unescape_literal(literal(value)) == value
