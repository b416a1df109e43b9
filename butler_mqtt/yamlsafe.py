"""The one YAML loader for files an operator hands us (etc/butler.yaml, `init --from-butler`,
YAML in environment overrides): PyYAML's safe loader, bounded.

A YAML file is small; one that is not is a mistake or an attack, and each way it can cost
memory or time is refused with a clear error (a `yaml.YAMLError`, so existing handlers apply):

* size: the file is read with a byte cap before anything is parsed (`read_text`);
* depth: nesting deeper than `MAX_DEPTH` is refused while composing (no RecursionError);
* aliases: a file may use a few (`MAX_ALIASES`), and the document they expand to may have at
  most `MAX_NODES` nodes: a "billion laughs" is a few lines that expand to 10^9 strings, refused
  before anything walks it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 64
MAX_ALIASES = 100
MAX_NODES = 100_000


class YamlLimit(yaml.MarkedYAMLError):
    """A YAML document over one of the limits (its `problem` says which, its mark where)."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader counting nesting depth and aliases while composing the node graph."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YamlLimit(problem=f"more than {MAX_ALIASES} aliases (*name)", problem_mark=mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YamlLimit(problem=f"nested deeper than {MAX_DEPTH} levels", problem_mark=mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has once every alias is expanded (shared nodes counted
    memoised, so this costs one pass over the nodes as written)."""
    sizes: dict[int, int] = {}
    order: list[yaml.Node] = []
    todo = [root]
    while todo:  # children before parents, without recursion
        node = todo.pop()
        if id(node) in sizes:
            continue
        sizes[id(node)] = -1
        order.append(node)
        todo.extend(_children(node))
    for node in reversed(order):
        sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in _children(node)), MAX_NODES + 1)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def compose(text: str) -> yaml.Node | None:
    """The node tree of one YAML document within the limits (a `yaml.YAMLError` otherwise)."""
    if len(text) > MAX_BYTES:
        raise YamlLimit(problem=f"larger than {MAX_BYTES} bytes")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
    except RecursionError:  # a belt to the depth limit's braces
        raise YamlLimit(problem=f"nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()
    if node is not None and _expanded_size(node) > MAX_NODES:
        raise YamlLimit(problem=f"aliases expand to more than {MAX_NODES} values", problem_mark=node.start_mark)
    return node


def load(text: str) -> Any:
    """Like `yaml.safe_load(text)`, within the limits."""
    node = compose(text)
    if node is None:
        return None
    loader = _BoundedLoader("")
    try:
        return loader.construct_document(node)
    except RecursionError:
        raise YamlLimit(problem=f"nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The file's text, refused (`YamlLimit`) past `MAX_BYTES` before more is read, or when it
    is no regular file (a FIFO or a device would block or never end)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO without a writer must not block the open
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise YamlLimit(problem="not a regular file")
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise YamlLimit(problem=f"larger than {MAX_BYTES} bytes")
    return data.decode(encoding)


def describe(exc: yaml.YAMLError) -> str:
    """`not valid YAML at line 3, column 5: <problem>` (limits: `refused YAML ...`)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    head = "refused YAML" if isinstance(exc, YamlLimit) else "not valid YAML"
    return f"{head}{where}: {problem}"
