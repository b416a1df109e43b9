"""The QRS filter language (``?filter=``), parsed once and compiled to a Python predicate.

Grammar (qrs-api.md section 4)::

    expr   := conj ("or" conj)*          -- "and" binds tighter than "or"
    conj   := term ("and" term)*
    term   := "(" expr ")" | clause
    clause := path op value
    path   := name ("." name)*           -- matched case-insensitively
    op     := eq | ne | gt | ge | lt | le | sw | ew | so
    value  := 'single-quoted string'     -- backslash escapes: \\' and \\\\
            | GUID | integer | true | false | null   (unquoted)

Evaluation follows what live QRS servers show:

* strings compare case-insensitively; GUIDs too (they are compared as strings);
* a path that crosses a collection (``tags.name``, ``customProperties.definition.name``,
  ``objectTypes``) is true when *any* element satisfies the clause, and every clause is
  evaluated on its own. So ``customProperties.definition.name eq 'A' and
  customProperties.value eq 'y'`` matches a task with ``A=x`` and ``B=y``: the pitfall real
  clients must guard against by re-checking the pair;
* ``so`` ("substring of") is true when the value occurs in the property;
* a quoted literal that looks like a date (``'2020-03-02T19:40:00.000Z'``,
  ``'2012-05-09 12:00:00'``) compares as an instant against date properties;
* a property that does not exist makes the clause false; a null on the way makes the leaf null.

Errors carry QRS's own texts: ``Cannot parse the expression: <filter>`` for anything
unparsable (including the SQL-style doubled quote ``''`` inside a literal, double-quoted
values and ``not``), ``Invalid expression`` for an empty group ``()``.

Choices where the research is silent: operator and conjunction keywords are accepted in any
case; unquoted words other than GUIDs, integers, ``true``, ``false`` and ``null`` (for example
enum names) are parse errors; an empty literal ``''`` is the empty string; a backslash before
any character yields that character; ordering operators on strings compare case-insensitively.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Predicate = Callable[["FilterSubject"], bool]

_OPS = frozenset({"eq", "ne", "gt", "ge", "lt", "le", "sw", "ew", "so"})
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")
_INT = re.compile(r"-?[0-9]+\Z")
_DATE_PREFIX = re.compile(r"\d{4}-\d{2}-\d{2}")
_MISSING = object()


class FilterError(ValueError):
    """The filter cannot be used; ``str(error)`` is the body QRS answers with its 400."""


@dataclass(frozen=True)
class CompiledFilter:
    """A parsed filter: ``matches(subject)`` evaluates it on a :class:`FilterSubject`.

    ``guid_lookup`` is set when the whole filter is ``<path> eq <guid> [or <path> eq <guid>]...``
    on one path, so that a store can answer from an index instead of scanning: the shape of
    the bulk "executionID eq A or executionID eq B ..." and "id eq ..." polls.
    """

    text: str
    matches: Predicate
    guid_lookup: tuple[str, frozenset[str]] | None


class FilterSubject:
    """One object (a JSON-like dict) as filters see it, with path lookups cached.

    Property names match case-insensitively. Caching the values found along each path (and
    their case-folded string forms) makes a repeated query over thousands of cached objects
    a set lookup per object.
    """

    __slots__ = ("_doc", "_leaves", "_folded")

    def __init__(self, doc: dict[str, Any]) -> None:
        self._doc = doc
        self._leaves: dict[tuple[str, ...], list[Any]] = {}
        self._folded: dict[tuple[str, ...], frozenset[str]] = {}

    def leaves(self, segs: tuple[str, ...]) -> list[Any]:
        """Every value reachable along the lower-cased path ``segs``.

        Collections are flattened at each step (that gives clauses their any-match meaning);
        a null on the way yields a null leaf; a missing property yields nothing.
        """
        found = self._leaves.get(segs)
        if found is None:
            found = self._leaves[segs] = _walk(self._doc, segs)
        return found

    def folded(self, segs: tuple[str, ...]) -> frozenset[str]:
        """The case-folded string values along ``segs``."""
        found = self._folded.get(segs)
        if found is None:
            found = frozenset(v.casefold() for v in self.leaves(segs) if type(v) is str)
            self._folded[segs] = found
        return found


def _walk(doc: dict[str, Any], segs: tuple[str, ...]) -> list[Any]:
    current: list[Any] = [doc]
    for seg in segs:
        following: list[Any] = []
        for item in current:
            if isinstance(item, dict):
                value = _get_folded(item, seg)
                if value is _MISSING:
                    continue
                if type(value) is list:
                    following.extend(value)
                else:
                    following.append(value)
            elif item is None:
                following.append(None)  # app.stream.name with no stream reads as null
        current = following
    return current


def _get_folded(item: dict[str, Any], seg: str) -> Any:
    """``item[seg]`` with the key compared case-insensitively (``seg`` is lower-case)."""
    value = item.get(seg, _MISSING)
    if value is _MISSING:
        for key, candidate in item.items():
            if key.lower() == seg:
                return candidate
    return value


def compile_filter(text: str) -> CompiledFilter:
    """Parse ``text`` and compile it; raises :class:`FilterError` with QRS's message."""
    parser = _Parser(text)
    node = parser.parse()
    return CompiledFilter(text, _compile(node), _guid_lookup(node))


# --- tokens -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tok:
    kind: str  # "(", ")", "str" or "word"
    text: str


def _tokenize(text: str, fail: Callable[[], FilterError]) -> list[_Tok]:
    tokens: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "()":
            tokens.append(_Tok(ch, ch))
            i += 1
        elif ch == "'":
            chars: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise fail()  # unterminated literal
                ch = text[i]
                if ch == "\\":
                    if i + 1 >= n:
                        raise fail()
                    chars.append(text[i + 1])
                    i += 2
                elif ch == "'":
                    i += 1
                    break
                else:
                    chars.append(ch)
                    i += 1
            tokens.append(_Tok("str", "".join(chars)))
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] not in "()'":
                i += 1
            tokens.append(_Tok("word", text[start:i]))
    return tokens


# --- syntax tree --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Clause:
    path: tuple[str, ...]  # lower-cased segments
    op: str
    value: str | int | bool | None
    is_guid: bool


@dataclass(frozen=True)
class _BoolOp:
    op: str  # "and" | "or"
    parts: tuple[_Node, ...]


_Node = _Clause | _BoolOp


class _Parser:
    def __init__(self, text: str) -> None:
        self._text = text
        self._toks = _tokenize(text, self._error)
        self._pos = 0

    def _error(self) -> FilterError:
        return FilterError(f"Cannot parse the expression: {self._text}")

    def _peek(self) -> _Tok | None:
        return self._toks[self._pos] if self._pos < len(self._toks) else None

    def _next(self) -> _Tok:
        tok = self._peek()
        if tok is None:
            raise self._error()
        self._pos += 1
        return tok

    def _at_keyword(self, word: str) -> bool:
        tok = self._peek()
        return tok is not None and tok.kind == "word" and tok.text.lower() == word

    def parse(self) -> _Node:
        node = self._expr()
        if self._peek() is not None:
            raise self._error()
        return node

    def _expr(self) -> _Node:
        parts = [self._conj()]
        while self._at_keyword("or"):
            self._pos += 1
            parts.append(self._conj())
        return parts[0] if len(parts) == 1 else _BoolOp("or", tuple(parts))

    def _conj(self) -> _Node:
        parts = [self._term()]
        while self._at_keyword("and"):
            self._pos += 1
            parts.append(self._term())
        return parts[0] if len(parts) == 1 else _BoolOp("and", tuple(parts))

    def _term(self) -> _Node:
        tok = self._next()
        if tok.kind == "(":
            after = self._peek()
            if after is not None and after.kind == ")":
                raise FilterError("Invalid expression")
            node = self._expr()
            if self._next().kind != ")":
                raise self._error()
            return node
        if tok.kind != "word" or not _PATH.match(tok.text):
            raise self._error()
        op = self._next()
        if op.kind != "word" or op.text.lower() not in _OPS:
            raise self._error()
        return self._value(tuple(tok.text.lower().split(".")), op.text.lower())

    def _value(self, path: tuple[str, ...], op: str) -> _Clause:
        tok = self._next()
        if tok.kind == "str":
            return _Clause(path, op, tok.text, False)
        if tok.kind != "word":
            raise self._error()
        word = tok.text
        if _GUID.match(word):
            return _Clause(path, op, word.lower(), True)
        if _INT.match(word):
            return _Clause(path, op, int(word), False)
        lowered = word.lower()
        if lowered in ("true", "false"):
            return _Clause(path, op, lowered == "true", False)
        if lowered == "null":
            return _Clause(path, op, None, False)
        raise self._error()


# --- compilation --------------------------------------------------------------------------


def _compile(node: _Node) -> Predicate:
    if isinstance(node, _Clause):
        return _compile_clause(node)
    preds = tuple(_compile(part) for part in node.parts)
    if node.op == "and":

        def all_of(subject: FilterSubject) -> bool:
            for pred in preds:
                if not pred(subject):
                    return False
            return True

        return all_of

    def any_of(subject: FilterSubject) -> bool:
        for pred in preds:
            if pred(subject):
                return True
        return False

    return any_of


def _compile_clause(clause: _Clause) -> Predicate:
    segs = clause.path
    if clause.op == "eq" and isinstance(clause.value, str) and not _is_dated(clause.value):
        # The hot case (id, name, tags.name, executionID ...): one set lookup per object.
        folded = clause.value.casefold()
        return lambda subject: folded in subject.folded(segs)
    test = _leaf_test(clause)

    def any_leaf(subject: FilterSubject) -> bool:
        for leaf in subject.leaves(segs):
            if test(leaf):
                return True
        return False

    return any_leaf


def _is_dated(literal: str) -> bool:
    return _DATE_PREFIX.match(literal) is not None and _parse_instant(literal) is not None


def _leaf_test(clause: _Clause) -> Callable[[Any], bool]:
    op, lit = clause.op, clause.value
    if lit is None:
        if op == "eq":
            return lambda leaf: leaf is None
        if op == "ne":
            return lambda leaf: leaf is not None
        return lambda leaf: False
    if isinstance(lit, bool):
        return _ordered(op, lambda leaf: leaf if type(leaf) is bool else _MISSING, lit)
    if isinstance(lit, int):
        return _ordered(op, lambda leaf: leaf if type(leaf) is int else _MISSING, lit)
    return _string_test(op, lit)


def _ordered(op: str, coerce: Callable[[Any], Any], lit: Any) -> Callable[[Any], bool]:
    """Comparison ``leaf <op> lit`` after ``coerce`` (which returns _MISSING on a type clash)."""
    compare = _COMPARE.get(op)
    if compare is None:
        return lambda leaf: False  # sw/ew/so only apply to strings

    def test(leaf: Any) -> bool:
        value = coerce(leaf)
        return value is not _MISSING and compare(value, lit)

    return test


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
}


def _string_test(op: str, lit: str) -> Callable[[Any], bool]:
    folded = lit.casefold()
    if op == "sw":
        return lambda leaf: type(leaf) is str and leaf.casefold().startswith(folded)
    if op == "ew":
        return lambda leaf: type(leaf) is str and leaf.casefold().endswith(folded)
    if op == "so":
        return lambda leaf: type(leaf) is str and folded in leaf.casefold()
    compare = _COMPARE[op]
    instant = _parse_instant(lit) if _DATE_PREFIX.match(lit) else None
    if instant is None:
        return lambda leaf: type(leaf) is str and compare(leaf.casefold(), folded)

    def dated(leaf: Any) -> bool:
        if type(leaf) is not str:
            return False
        when = _parse_instant(leaf) if _DATE_PREFIX.match(leaf) else None
        if when is None:
            return compare(leaf.casefold(), folded)
        return compare(when, instant)

    return dated


def _parse_instant(text: str) -> dt.datetime | None:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    # QRS dates are UTC; a literal without an offset means UTC too.
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _or_operands(node: _Node) -> list[_Node]:
    if isinstance(node, _BoolOp) and node.op == "or":
        return [leaf for part in node.parts for leaf in _or_operands(part)]
    return [node]


def _guid_lookup(node: _Node) -> tuple[str, frozenset[str]] | None:
    paths: set[tuple[str, ...]] = set()
    values: set[str] = set()
    for part in _or_operands(node):
        if not (isinstance(part, _Clause) and part.op == "eq" and part.is_guid):
            return None
        paths.add(part.path)
        values.add(str(part.value))
    if len(paths) != 1:
        return None
    return ".".join(paths.pop()), frozenset(values)


def compile_orderby(text: str) -> Callable[[FilterSubject], tuple[Any, ...]] | None:
    """Compile ``prop [asc|desc], prop2 ...`` to a sort key on subjects, or None when empty.

    A multi-valued property sorts by its first value; nulls and missing values sort first,
    strings case-insensitively. ``desc`` is honoured per property by sorting numbers and
    strings through a reversing wrapper. Raises :class:`FilterError` on a malformed spec.
    """
    keys: list[tuple[tuple[str, ...], bool]] = []
    for part in text.split(","):
        words = part.split()
        if not words:
            continue
        if len(words) > 2 or not _PATH.match(words[0]):
            raise FilterError(f"Cannot parse the expression: {text}")
        direction = words[1].lower() if len(words) == 2 else "asc"
        if direction not in ("asc", "desc"):
            raise FilterError(f"Cannot parse the expression: {text}")
        keys.append((tuple(words[0].lower().split(".")), direction == "desc"))
    if not keys:
        return None

    def sort_key(subject: FilterSubject) -> tuple[Any, ...]:
        out: list[Any] = []
        for segs, desc in keys:
            found = subject.leaves(segs)
            value = _sortable(found[0] if found else None)
            out.append(_Reversed(value) if desc else value)
        return tuple(out)

    return sort_key


def _sortable(value: Any) -> tuple[int, Any]:
    # Rank by type first so mixed values never compare across types.
    if value is None:
        return (0, 0)
    if isinstance(value, bool | int | float):
        return (1, value)
    if isinstance(value, str):
        return (2, value.casefold())
    return (3, str(value))


@dataclass(frozen=True)
class _Reversed:
    value: tuple[int, Any]

    def __lt__(self, other: _Reversed) -> bool:
        return bool(other.value < self.value)
