"""The JSONC reader: JSON with comments and trailing commas, keeping what validation needs.

Objects keep their pairs in document order, duplicates included (Go's decoder folds
keys; lmproxy reports a repeated field), and a number that no integer field could take
(a fraction, an exponent, NaN) is kept as its text, for the message that refuses it.
Comments are blanked rather than removed, so that JSON's line and column numbers are
the file's.
"""

from __future__ import annotations

import json
import re

from lmproxy.config.model import ConfigError

_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


class JsonObject:
    """A JSON object, as its (key, value) pairs in document order (duplicates kept)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        self.pairs = pairs


class JsonNumber:
    """A number that is not an integer lmproxy could take: a fraction, an exponent,
    an integer too long to be in any range, or NaN/Infinity (not JSON at all)."""

    __slots__ = ("text", "valid_json")

    def __init__(self, text: str, valid_json: bool = True) -> None:
        self.text = text
        self.valid_json = valid_json


def _parse_int(text: str) -> int | JsonNumber:
    return int(text) if len(text) <= 40 else JsonNumber(text)


def _parse_constant(text: str) -> JsonNumber:
    return JsonNumber(text, valid_json=False)


def _line_column(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - text.rfind("\n", 0, index)


def _strip_jsonc(text: str) -> str:
    """Blank out comments and trailing commas, keeping every other character (and so
    every line and column) where it was. Strings are copied untouched."""
    out = list(text)
    n = len(text)
    i = 0
    pending_comma = -1  # a comma followed so far only by whitespace and comments
    previous = ""  # the last significant character before it
    while i < n:
        char = text[i]
        if char == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            pending_comma, previous = -1, '"'
            continue
        if char == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end == -1 else end
            out[i:end] = " " * (end - i)
            i = end
            continue
        if char == "/" and text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                line, column = _line_column(text, i)
                raise ConfigError([("$", f"line {line} column {column}: unterminated /* comment")])
            for j in range(i, end + 2):
                if out[j] != "\n":
                    out[j] = " "
            i = end + 2
            continue
        if char in " \t\r\n":
            i += 1
            continue
        if char in "]}" and pending_comma >= 0:
            out[pending_comma] = " "
        # A comma right after "[", "{", "," or ":" is not a trailing one: json reports it.
        pending_comma = i if char == "," and previous not in ("", "[", "{", ",", ":") else -1
        previous = char
        i += 1
    return "".join(out)


def decode(text: str) -> object:
    stripped = _strip_jsonc(text)
    try:
        return json.loads(
            stripped,
            object_pairs_hook=JsonObject,
            parse_float=JsonNumber,
            parse_int=_parse_int,
            parse_constant=_parse_constant,
        )
    except json.JSONDecodeError as error:
        raise ConfigError(
            [("$", f"line {error.lineno} column {error.colno}: {error.msg}")]
        ) from None
    except RecursionError:
        raise ConfigError([("$", "the JSON is nested too deeply")]) from None
    except ValueError as error:  # defensive: json.loads has no other documented errors
        raise ConfigError([("$", f"invalid JSON: {error}")]) from None


def show(value: object) -> str:
    """How a JSON value is named in a message."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, JsonObject):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, JsonNumber):
        text = value.text if value.valid_json else f"{value.text} (not valid JSON)"
    else:
        text = repr(value)
    if len(text) > 80:
        text = f"{text[:60]}...{text[-12:]} ({len(text)} characters)"
    return text


def child(path: str, key: str) -> str:
    if _PLAIN_KEY_RE.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]"
