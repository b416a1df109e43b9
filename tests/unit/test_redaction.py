"""What may be shown of a URL (redaction.py) and of a value on a terminal (terminal.py): pure,
over generated inputs."""

from __future__ import annotations

import json
import string
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from butler_mqtt.redaction import redact_url, url_problem, url_secrets
from butler_mqtt.terminal import json_text, terminal_text

SECRET = st.text(alphabet=string.ascii_letters + string.digits + "-_.~", min_size=8, max_size=40)


@given(password=SECRET, path=SECRET, token=SECRET, port=st.integers(min_value=-5, max_value=200_000))
def test_a_url_is_shown_without_its_password_path_or_query_values(password, path, token, port):
    url = f"https://user:{password}@hooks.example:{port}/services/{path}?token={token}&x={token}"
    shown = redact_url(url)
    assert password not in shown and path not in shown and token not in shown
    assert shown.startswith("https://***@hooks.example") and "token=***" in shown
    problem = url_problem(url, ("http", "https"))
    assert (problem is None) == (1 <= port <= 65535)
    assert problem is None or (password not in problem and token not in problem)
    assert {password, token} <= set(url_secrets(url)) and any(path in s for s in url_secrets(url))


@given(st.text())
def test_terminal_text_is_always_printable(text):
    shown = terminal_text(text)
    assert all(c.isprintable() or unicodedata.category(c) == "Zs" for c in shown)  # spaces of other widths stay


@given(st.dictionaries(st.text(), st.text()))
def test_json_text_is_the_same_json_without_anything_a_terminal_acts_on(value):
    text = json_text(value)
    assert json.loads(text) == value
    assert not any(0x7F <= ord(c) <= 0x9F or c in "\u202e\u2028\u2029\x1b\n" for c in text)
