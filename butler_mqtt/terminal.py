"""Text for a terminal (pure): what the CLI prints of values it did not write itself (requestIds,
task names from QRS, reasons, replies from the broker) never acts on the terminal. A newline
would forge a table row, an escape sequence (ESC, or C1's CSI) move the cursor or retitle the
window, a bidi override reorder what is shown.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: What a terminal acts on instead of showing: C0/C1 controls, DEL, format characters (bidi
#: overrides), line and paragraph separators. Outside JSON's own escapes (< U+0020).
_TERMINAL_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]")


def terminal_text(text: str) -> str:
    """`text` with every character a terminal would act on (a newline forging a row, an escape
    sequence, a bidi override) written as a visible escape (`\\n`, `\\x1b`, `\\u202e`)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else _escape(c) for c in text)


def _escape(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    if unicodedata.category(c) == "Zs":  # a space of another width: shown, harmless
        return c
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def json_text(value: Any, indent: int | None = None) -> str:
    """JSON for a terminal, as readable as `ensure_ascii=False`: JSON escapes C0 controls itself;
    the rest a terminal acts on (DEL, C1, bidi overrides, separators) is written as a \\u escape
    too (they occur only inside strings, so the text stays the same JSON)."""
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    return _TERMINAL_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
