"""Why a reload failed, as text we can publish: pure functions, no I/O (contract section 8).

* :func:`failure_texts`: an ExecutionResult (as QRS sends it, any shape) -> the failure
  ``message`` (its newest Error detail) and ``details`` (its detail messages, oldest first).
* :class:`TailBuffer`: fed a script log's bytes as they arrive, keeps only the last N lines
  (a ``deque(maxlen=N)``; each line cut at ``LINE_CHARS`` while it is read, so a 200 MB log
  or a log without a single line end costs the same few KiB). Encoding by BOM (qrs-api.md
  13.7): ``EF BB BF`` UTF-8 (stripped), ``FF FE`` / ``FE FF`` UTF-16 LE/BE, a BOM-less UTF-16
  recognised by its NUL bytes, else UTF-8; undecodable bytes become U+FFFD. Lines split on
  ``\\r\\n`` or ``\\n``.

Every text that leaves here is capped (message 2,000 characters, each detail and log line
1,000, the tail 64 KiB of UTF-8 in all) and safe to publish and store: no lone surrogates, no
NUL or other control characters except tab (each becomes U+FFFD).
"""

from __future__ import annotations

import codecs
import re
from collections import deque
from collections.abc import Mapping
from typing import Any

MESSAGE_CHARS = 2000
LINE_CHARS = 1000
TAIL_BYTES = 64 * 1024
#: At most this many detail messages are kept (the newest); QRS keeps a handful per run.
MAX_DETAILS = 100
ELLIPSIS = "…"

_DETAIL_ERROR, _DETAIL_WARNING = 0, 1
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def clean(text: str, limit: int) -> str:
    """``text`` made safe (line ends -> a space; other controls but tab, lone surrogates ->
    U+FFFD) and cut to ``limit`` characters (the last one then an ellipsis)."""
    if len(text) > limit:
        text = text[: limit - 1] + ELLIPSIS
    if "\n" in text or "\r" in text:
        text = " ".join(text.splitlines())
    return _UNSAFE.sub("\ufffd", text)


def _sort_key(item: tuple[int, Mapping[str, Any]]) -> tuple[str, int]:
    index, detail = item
    created = detail.get("detailCreatedDate")
    return (created if isinstance(created, str) else "", index)


def failure_texts(result: Any) -> tuple[str, list[str]]:
    """(``message``, ``details``) of an ExecutionResult (full or condensed, as QRS sends it).

    ``details``: the detail messages sorted by ``detailCreatedDate`` (QRS lists them in no
    particular order), oldest first, the newest ``MAX_DETAILS`` kept. ``message``: the newest
    Error detail (``detailsType`` 0); without one the newest Warning, then the newest detail of
    any kind; without any detail ``""``. Entries that are not objects with a string message
    are skipped; a result that is not an object gives ``("", [])``.
    """
    raw = result.get("details") if isinstance(result, Mapping) else None
    entries = [
        (i, d) for i, d in enumerate(raw if isinstance(raw, list) else [])
        if isinstance(d, Mapping) and isinstance(d.get("message"), str)
    ]
    entries.sort(key=_sort_key)
    ordered = [d for _, d in entries]
    message = ""
    for kind in (_DETAIL_ERROR, _DETAIL_WARNING, None):
        found = [d for d in ordered if kind is None or _kind(d) == kind]
        if found:
            message = found[-1]["message"]
            break
    details = [clean(d["message"], LINE_CHARS) for d in ordered[-MAX_DETAILS:]]
    return clean(message, MESSAGE_CHARS), details


def _kind(detail: Mapping[str, Any]) -> int | None:
    kind = detail.get("detailsType")
    return kind if isinstance(kind, int) and not isinstance(kind, bool) else None


def sniff_encoding(start: bytes) -> tuple[str, int]:
    """(codec, BOM length) for a log starting with ``start`` (its first bytes, >= 2 if any)."""
    for bom, codec in _BOMS:
        if start.startswith(bom):
            return codec, len(bom)
    sample = start[:64]
    if len(sample) >= 8:
        odd_nuls = sample[1::2].count(0)
        even_nuls = sample[0::2].count(0)
        if odd_nuls * 2 >= len(sample) // 2 and even_nuls == 0:
            return "utf-16-le", 0
        if even_nuls * 2 >= len(sample) // 2 and odd_nuls == 0:
            return "utf-16-be", 0
    return "utf-8", 0


class TailBuffer:
    """The last ``lines`` lines of a byte stream, fed in chunks (see the module docstring).

    Memory: at most ``lines`` lines of ``LINE_CHARS`` characters, plus the chunk being fed.
    """

    def __init__(self, lines: int) -> None:
        self._tail: deque[str] = deque(maxlen=max(0, lines))
        self._start = b""
        self._decoder: codecs.IncrementalDecoder | None = None
        self._partial: list[str] = []  # pieces of the current (unended) line, LINE_CHARS at most
        self._partial_len = 0
        self.bytes_seen = 0

    def feed(self, data: bytes) -> None:
        self.bytes_seen += len(data)
        if self._decoder is None:
            self._start += data
            if len(self._start) < 64:
                return  # too little to tell the encoding yet (see close)
            data, self._start = self._start, b""
            self._begin(data)
            return
        self._text(self._decoder.decode(data))

    def _begin(self, data: bytes) -> None:
        codec, bom = sniff_encoding(data)
        self._decoder = codecs.getincrementaldecoder(codec)(errors="replace")
        self._text(self._decoder.decode(data[bom:]))

    def _text(self, text: str) -> None:
        pieces = text.split("\n")
        complete = pieces[:-1]
        keep = self._tail.maxlen or 0
        if len(complete) > keep:
            # The line being read and all but the last `keep` lines of this chunk would only be
            # pushed out of the tail again: skip them (a 200 MB log is mostly skipped here).
            self._partial, self._partial_len = [], 0
            complete = complete[len(complete) - keep :] if keep else []
        for piece in complete:
            self._add_to_line(piece)
            self._end_line()
        self._add_to_line(pieces[-1])

    def _add_to_line(self, piece: str) -> None:
        room = LINE_CHARS + 1 - self._partial_len  # one more than the cap: shows it was cut
        if room <= 0:
            return
        if len(piece) > room:
            piece = piece[:room]
        self._partial.append(piece)
        self._partial_len += len(piece)

    def _end_line(self) -> None:
        line = "".join(self._partial)
        self._tail.append(line[:-1] if line.endswith("\r") else line)  # cleaned in close()
        self._partial = []
        self._partial_len = 0

    def close(self) -> list[str]:
        """The tail: the last lines (a final line without a line end counts; a final empty
        one does not), the oldest dropped until the UTF-8 total fits ``TAIL_BYTES``."""
        if self._decoder is None:
            data, self._start = self._start, b""
            self._begin(data)
        assert self._decoder is not None
        self._text(self._decoder.decode(b"", final=True))
        if self._partial_len:
            self._end_line()
        return cap_tail([clean(line, LINE_CHARS) for line in self._tail])


def cap_tail(lines: list[str], limit: int = TAIL_BYTES) -> list[str]:
    """The newest ``lines`` whose UTF-8 sizes (plus one line end each) fit ``limit`` bytes."""
    total = 0
    kept: list[str] = []
    for line in reversed(lines):
        total += len(line.encode("utf-8")) + 1
        if total > limit:
            break
        kept.append(line)
    kept.reverse()
    return kept


def tail_of(data: bytes, lines: int) -> list[str]:
    """The tail of a whole log held in memory (for small inputs and tests)."""
    buffer = TailBuffer(lines)
    buffer.feed(data)
    return buffer.close()
