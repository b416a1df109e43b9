"""Failure texts and script-log tails: pure, bounded, always publishable (contract section 8)."""

from __future__ import annotations

from typing import Any

import pytest

from butler_mqtt.backends.qrs.logtail import (
    LINE_CHARS,
    MAX_DETAILS,
    MESSAGE_CHARS,
    TAIL_BYTES,
    TailBuffer,
    cap_tail,
    clean,
    failure_texts,
    sniff_encoding,
    tail_of,
)


def detail(message: Any, at: str, kind: Any = 2) -> dict[str, Any]:
    return {"id": "x", "detailsType": kind, "message": message, "detailCreatedDate": at, "privileges": None}


def publishable(text: str) -> bool:
    text.encode("utf-8")  # raises on lone surrogates
    return not any(ord(c) < 32 and c != "\t" for c in text)


def test_details_oldest_first_and_the_newest_error_is_the_message() -> None:
    result = {
        "status": 8,
        "details": [
            detail("Changing task state from Started to FinishedFail", "2026-12-07T10:00:05.000Z"),
            detail("Field 'Amount' not found", "2026-12-07T10:00:04.000Z", 0),
            detail("Changing task state to Triggered", "2026-12-07T10:00:00.000Z"),
            detail("older error", "2026-12-07T10:00:01.000Z", 0),
            detail("a warning", "2026-12-07T10:00:04.500Z", 1),
        ],
    }
    message, details = failure_texts(result)
    assert message == "Field 'Amount' not found"
    assert details == [
        "Changing task state to Triggered",
        "older error",
        "Field 'Amount' not found",
        "a warning",
        "Changing task state from Started to FinishedFail",
    ]


def test_without_an_error_the_warning_then_the_newest_detail_is_the_message() -> None:
    warn = [detail("w", "2026-01-01T00:00:01.000Z", 1), detail("i", "2026-01-01T00:00:02.000Z")]
    assert failure_texts({"details": warn})[0] == "w"
    assert failure_texts({"details": warn[1:]})[0] == "i"
    assert failure_texts({"details": []}) == ("", [])


@pytest.mark.parametrize(
    "result",
    [None, [], "x", 7, {"details": None}, {"details": "    "}, {"details": [1, None, "a", {"message": 5}]},
     {"details": [{"detailsType": True, "message": "m", "detailCreatedDate": 5}]}],
)
def test_odd_results_give_texts_not_exceptions(result: Any) -> None:
    message, details = failure_texts(result)
    assert isinstance(message, str) and all(isinstance(d, str) for d in details)


def test_texts_are_capped_and_cleaned() -> None:
    evil = "A" * 5000 + "\x00\ud800\x1b[31m"
    result = {"details": [detail(evil, "2026-01-01T00:00:00.000Z", 0), detail("two\r\nlines\x00", "2026-01-01T00:00:01.000Z")]}
    result["details"] += [detail(f"d{i}", f"2026-01-02T00:00:{i % 60:02d}.{i:03d}Z") for i in range(300)]
    message, details = failure_texts(result)
    assert len(message) == MESSAGE_CHARS and message.endswith("…") and publishable(message)
    assert len(details) == MAX_DETAILS and details[-1] == "d299"
    assert all(len(d) <= LINE_CHARS and publishable(d) for d in details)
    assert clean("two\r\nlines\x00", 100) == "two lines\ufffd"


def test_tail_is_the_last_lines_crlf_and_lf_bom_stripped() -> None:
    log = "\ufeff" + "".join(f"line {i}\r\n" for i in range(100)) + "last\n"
    assert tail_of(log.encode("utf-8"), 3) == ["line 98", "line 99", "last"]
    assert tail_of(b"a\nb\nc", 2) == ["b", "c"]  # a last line without a line end counts
    assert tail_of(b"a\r\nb\r\n\r\n", 2) == ["b", ""]  # an empty line inside counts, the final end not
    assert tail_of(b"", 5) == [] and tail_of(b"abc\r\n", 0) == []


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("bom", [True, False])
def test_utf16_logs_with_and_without_bom(codec: str, bom: bool) -> None:
    text = ("\ufeff" if bom else "") + "".join(f"Zeile {i} Größe €\r\n" for i in range(50))
    assert tail_of(text.encode(codec), 2) == ["Zeile 48 Größe €", "Zeile 49 Größe €"]


def test_sniff() -> None:
    assert sniff_encoding(b"\xef\xbb\xbfabc") == ("utf-8", 3)
    assert sniff_encoding(b"\xff\xfea\x00") == ("utf-16-le", 2)
    assert sniff_encoding(b"\xfe\xff\x00a") == ("utf-16-be", 2)
    assert sniff_encoding(b"plain ascii text, long enough") == ("utf-8", 0)


def test_invalid_utf8_and_binary_noise_become_replacement_characters() -> None:
    data = b"\xef\xbb\xbfok\r\nbad \x80\xc0\xaf\xff\x00\x07 x\r\n" + bytes(range(256)) * 4
    tail = tail_of(data, 10)
    assert tail[:2] == ["ok", "bad \ufffd\ufffd\ufffd\ufffd\ufffd\ufffd x"]
    assert all(publishable(line) and len(line) <= LINE_CHARS for line in tail)


def test_chunk_boundaries_change_nothing() -> None:
    text = "\ufeff" + "".join(f"{i} äöü € 😀\r\n" for i in range(200))
    for codec in ("utf-8", "utf-16-le"):
        data = text.encode(codec)
        whole = tail_of(data, 7)
        buffer = TailBuffer(7)
        for i in range(len(data)):
            buffer.feed(data[i : i + 1])
        assert buffer.close() == whole and whole[-1] == "199 äöü € 😀"


def test_a_log_without_line_ends_costs_one_capped_line() -> None:
    buffer = TailBuffer(40)
    for _ in range(100):
        buffer.feed(b"x" * 65536)
    (line,) = buffer.close()
    assert len(line) == LINE_CHARS and line.endswith("…")


def test_long_lines_are_capped_and_the_tail_fits_64_kib() -> None:
    data = "".join(f"{i} " + "é" * 3000 + "\r\n" for i in range(100)).encode()
    tail = tail_of(data, 100)
    assert all(len(line) == LINE_CHARS for line in tail)
    assert sum(len(line.encode()) + 1 for line in tail) <= TAIL_BYTES
    assert tail[-1].startswith("99 ") and len(tail) < 100


def test_cap_tail_keeps_the_newest() -> None:
    assert cap_tail(["aaaa", "bb", "c"], 5) == ["bb", "c"]
    assert cap_tail(["x" * 10], 5) == []
