"""Building QRS `filter=` expressions from start criteria.

QRS string literals are single-quoted with backslash escapes: `\\` before `\\` and `'`
(qrs-api.md 4.2; the doubled `''` form is rejected by a live QRS). GUIDs go unquoted. The
whole filter is URL-encoded by the caller (`requests` does it for `params=`), so `&`, `#`,
`+` and `%` inside names cannot cut or change the query string.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from urllib.parse import quote_plus

from butler_mqtt.model import StartRequest, is_guid


def escape(value: str) -> str:
    """Escape a value for a single-quoted QRS string literal."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def literal(value: str) -> str:
    return f"'{escape(value)}'"


def id_clause(task_id: str) -> str:
    if not is_guid(task_id):  # never let anything but a GUID go unquoted
        raise ValueError(f"not a GUID: {task_id!r}")
    return f"id eq {task_id}"


def app_clause(app_id: str) -> str:
    """Every reload task of the app (contract section 9: `appId` with backend: qrs)."""
    if not is_guid(app_id):  # never let anything but a GUID go unquoted
        raise ValueError(f"not a GUID: {app_id!r}")
    return f"app.id eq {app_id}"


def tag_clause(tag: str) -> str:
    return f"tags.name eq {literal(tag)}"


def cp_clause(name: str, value: str) -> str:
    # QRS evaluates each clause against any property of the task, so this also matches a
    # task whose *other* property has the value: selection re-checks the pair.
    return f"(customProperties.definition.name eq {literal(name)} and customProperties.value eq {literal(value)})"


def criteria_clauses(req: StartRequest) -> list[str]:
    """One clause per criterion of one stage, in request order, without duplicates."""
    clauses = [id_clause(t) for t in req.taskId]
    clauses += [app_clause(a) for a in req.appId]
    clauses += [tag_clause(t) for t in req.tag]
    clauses += [cp_clause(c.name, c.value) for c in req.customProperty]
    return list(dict.fromkeys(clauses))


def encoded_length(expr: str) -> int:
    return len(quote_plus(expr, safe=""))


def chunk_or(clauses: Sequence[str], max_encoded: int) -> Iterator[str]:
    """Join clauses with ` or ` into as few filters as fit `max_encoded` URL-encoded chars.

    A single clause longer than the limit still goes out alone (QRS may accept it; refusing
    it here would turn a long name into a silent not-found).
    """
    current: list[str] = []
    size = 0
    sep = encoded_length(" or ")
    for clause in clauses:
        n = encoded_length(clause)
        if current and size + sep + n > max_encoded:
            yield " or ".join(current)
            current, size = [], 0
        size += (sep if current else 0) + n
        current.append(clause)
    if current:
        yield " or ".join(current)


def execution_filters(execution_ids: Iterable[str], max_encoded: int, field: str = "executionID") -> Iterator[str]:
    """`executionID eq A or executionID eq B ...`, chunked, for following executions (`field`:
    `id` to look up ExecutionResults by their own id). Only GUIDs ever reach the filter."""
    return chunk_or([f"{field} eq {e}" for e in execution_ids if is_guid(e)], max_encoded)
