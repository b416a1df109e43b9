"""`butler-mqtt token`: a new random caller token, printed once, and its SHA-256 for
callers[].tokens_sha256 (contract section 10); `--hash` hashes an existing one from stdin."""

from __future__ import annotations

import hashlib
import io
import re

from butler_mqtt.callers import Callers
from butler_mqtt.cli import EXIT_OK, EXIT_USAGE, main
from butler_mqtt.config import Config


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["token", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_token_prints_a_new_token_once_and_where_its_hash_goes(capsys):
    code, out, err = run(capsys, "--caller", "erp")
    assert code == EXIT_OK and err == ""
    token = re.search(r"^token:  (\S+)$", out, re.M)
    digest = re.search(r"^sha256: ([0-9a-f]{64})$", out, re.M)
    assert token and digest
    tok, dig = token.group(1), digest.group(1)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", tok)  # 256 random bits, URL-safe
    assert hashlib.sha256(tok.encode()).hexdigest() == dig
    assert out.count(tok) == 1  # the token once; the hash twice (its line and the one to paste)
    assert "callers" in out and "erp's entry" in out and f'tokens_sha256: ["{dig}"]' in out
    # The printed hash makes a config in which the token is that caller.
    c = Callers(Config.model_validate({"callers": [{"name": "erp", "tokens_sha256": [dig]}]}))
    found = c.identify_rest(f"Bearer {tok}", None)
    assert found is not None and found.name == "erp"


def test_two_tokens_are_different(capsys):
    first, second = run(capsys)[1], run(capsys)[1]
    assert first.splitlines()[0] != second.splitlines()[0]


def test_hash_of_an_existing_token_from_stdin(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("legacy-token\n"))
    code, out, _ = run(capsys, "--hash")
    assert code == EXIT_OK and out == hashlib.sha256(b"legacy-token").hexdigest() + "\n"
    assert "legacy-token" not in out


def test_hash_refuses_an_empty_or_non_ascii_token(capsys, monkeypatch):
    for given in ("\n", "", "tök\n", "a\tb\n"):
        monkeypatch.setattr("sys.stdin", io.StringIO(given))
        code, out, err = run(capsys, "--hash")
        assert code == EXIT_USAGE and out == "" and "printable ASCII" in err
        assert "tök" not in err


def test_a_bad_caller_name_is_a_usage_error_and_no_token_is_printed(capsys):
    code, out, err = run(capsys, "--caller", "ERP\x1b[2J")
    assert code == EXIT_USAGE and out == "" and "--caller" in err and "\x1b" not in err
