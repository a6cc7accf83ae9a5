"""Render config values safely into systemd unit files.

Every function here takes a value from the (untrusted) config and returns text that
can be put after ``Setting=`` on one line of a unit file, such that systemd reads back
exactly that value: a value can never end the line (and so start another directive or
section), continue onto the next line, expand a ``%`` specifier, expand a ``$``
variable or turn into a command prefix. What cannot be represented is refused with
``ValueError``; nothing is silently altered.

Which function for which setting (checked against systemd 252):

``exec_line(argv)``
    ``ExecStart=``, ``ExecStartPre=``, ``ExecStartPost=``, ``ExecStop=``,
    ``ExecStopPost=``, ``ExecReload=``, ``ExecCondition=``: one command, no shell.
``environment_assignment(key, value)``
    ``Environment=`` (one assignment per call; several may share a line, space-separated).
``environment_file_line(key, value)``
    One line of a file read by ``EnvironmentFile=`` (not a unit file: there systemd's
    own shell-like reader applies, and no specifier or variable is expanded).
``quote_value(s)``
    Settings that take their whole value verbatim and expand only specifiers:
    ``Description=``, ``SyslogIdentifier=``, ``User=``, ``Group=``, ``Documentation=``
    (one URL). *Not* for settings that unquote or split their value (``Exec*=``,
    ``Environment=``, ``ReadWritePaths=`` and other lists) nor for settings that do not
    expand specifiers (there ``%%`` would stay ``%%``).
``path_value(path)``
    Single absolute paths: ``WorkingDirectory=``, ``EnvironmentFile=``,
    ``StandardOutput=``/``StandardError=`` after ``append:``, ``file:`` or
    ``truncate:``, ``StandardInput=file:``. These are taken verbatim (no unquoting), so
    spaces and quotes are part of the path. *Not* for path lists such as
    ``ReadWritePaths=`` or ``BindPaths=``, which split at whitespace and ``:``.
``listen_stream(address, port)``
    ``ListenStream=`` (and ``ListenDatagram=``) for an IP literal and a port.

What systemd does, and so what is done here:

* Exec lines are split into words with quotes removed and C escapes decoded *first*;
  only then are command prefixes (``-@:+!``) stripped from the first word, and
  specifiers expanded in each word. So quoting a first word does not protect it from
  being read as a prefix (``"-foo"`` runs ``foo`` and ignores its failure), a quoted
  lone ``";"`` as first word still separates commands, and a ``\\x25`` escape is a
  ``%`` that does expand. Hence every ``%`` is written ``%%`` and is never produced by an
  escape, and a first argument that starts with a prefix character is refused (an
  absolute path never does).
* When the command runs, ``$$`` becomes ``$``, ``${X}`` is expanded anywhere in a word
  and ``$X`` when it is a whole word. This happens in the arguments passed to the
  program, argv[0] included, but *not* in the path that is executed. So ``$`` is
  written ``$$`` in every argument, and when argv[0] contains ``$`` the line is written
  in the ``@`` form, ``"@/path/with$dollar" "/path/with$$dollar" ...``, which gives the
  executed path and argv[0] separately. ``Environment=`` values are not ``$``-expanded.
* The executed path may not contain quotes, backslashes or control characters (systemd
  refuses the line); it must be absolute or a bare name (looked up in systemd's fixed
  search path, not ``$PATH``).
* Plain values are used verbatim after stripping leading and trailing blanks (space,
  tab, CR, LF), and a line whose backslashes, read as escape pairs from the start of the
  line, leave one dangling at the end continues onto the next line. Such values are
  refused.
* systemd refuses, as "not UTF-8 clean", a line holding a Unicode noncharacter
  (U+FDD0..U+FDEF, U+xFFFE, U+xFFFF), as well as any escape of one made with ``\\U``; they
  are refused here, and so are lone surrogates (which cannot be written as UTF-8).
* A unit file line may be at most 1 MiB long (``LONG_LINE_MAX``); longer values are
  refused.
* ``ListenStream=`` does not accept IPv6 scope IDs (``fe80::1%eth0``); they are refused.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import unicodedata
from collections.abc import Sequence

__all__ = [
    "MAX_VALUE_BYTES",
    "PREFIX_CHARS",
    "environment_assignment",
    "environment_file_line",
    "exec_line",
    "listen_stream",
    "listen_stream_path",
    "path_value",
    "quote_value",
]

#: Characters that systemd strips from the start of an Exec*= command as flags.
PREFIX_CHARS = frozenset("-@:+!")

#: systemd refuses unit file lines over 1 MiB (LONG_LINE_MAX); leave room for the key.
MAX_VALUE_BYTES = 1024 * 1024 - 256

_NAME_MAX = 255  # bytes in one path component
_PATH_MAX = 4096  # bytes in a path, including the terminating NUL

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# systemd's strstrip() removes these from both ends of a value.
_SYSTEMD_WHITESPACE = " \t\n\r"

# Characters that systemd's string_is_safe() refuses in the executed path (besides
# control characters): quotes and backslash.
_UNSAFE_IN_EXECUTABLE = frozenset("\"'\\")

_NAMED_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
    "%": "%%",
}


def _is_noncharacter(code: int) -> bool:
    return 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE


def _check_chars(s: str, what: str) -> None:
    """Refuse what no systemd setting can carry: NUL, surrogates, noncharacters."""
    for ch in s:
        code = ord(ch)
        if code == 0:
            raise ValueError(f"{what} contains a NUL character")
        if 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"{what} contains a lone surrogate U+{code:04X} (not valid UTF-8)")
        if _is_noncharacter(code):
            raise ValueError(
                f"{what} contains the Unicode noncharacter U+{code:04X}, which systemd "
                "refuses as not UTF-8 clean"
            )


def _check_length(value: str, what: str) -> str:
    if len(value.encode("utf-8")) > MAX_VALUE_BYTES:
        raise ValueError(f"{what} is too long for one unit file line (limit 1 MiB)")
    return value


def _escape_char(ch: str, *, dollar: bool) -> str:
    named = _NAMED_ESCAPES.get(ch)
    if named is not None:
        return named
    if ch == "$":
        return "$$" if dollar else "$"
    if ch == " " or ch.isprintable():
        return ch
    code = ord(ch)
    if code < 0x80:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _quote_word(s: str, *, dollar: bool) -> str:
    """One double-quoted word that systemd's unquoting turns back into ``s``.

    ``%`` is doubled (specifiers are expanded after unquoting); with ``dollar``, ``$`` is
    doubled (for Exec*= lines, where ``$`` starts a variable). Backslash, double quote
    and characters that are not printable are written as C escapes, so the word is one
    line of printable text.
    """
    return '"' + "".join(_escape_char(ch, dollar=dollar) for ch in s) + '"'


def _check_executable(path: str) -> None:
    """Refuse an argv[0] that systemd would not take as exactly this executable."""
    if not path:
        raise ValueError("the command (argv[0]) is empty")
    if path[0] in PREFIX_CHARS:
        raise ValueError(
            f"the command {path!r} starts with {path[0]!r}, which systemd reads as a "
            "command prefix even when quoted; use an absolute path"
        )
    if path == ";":
        raise ValueError("the command ';' would be read by systemd as a command separator")
    for ch in path:
        if ch in _UNSAFE_IN_EXECUTABLE or ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise ValueError(
                f"the command {path!r} contains {ch!r}; systemd refuses quotes, "
                "backslashes and control characters in the executable path"
            )
    if path.endswith("/"):
        raise ValueError(f"the command {path!r} names a directory")
    if not path.startswith("/"):
        if "/" in path or path in {".", ".."}:
            raise ValueError(
                f"the command {path!r} is neither an absolute path nor a bare executable name"
            )
        if len(path.encode("utf-8")) > _NAME_MAX:
            raise ValueError(f"the command name {path!r} is too long")


def exec_line(argv: Sequence[str], *, ignore_failure: bool = False) -> str:
    """The value of an ``Exec*=`` setting that runs exactly ``argv``, without a shell.

    Every argument is double-quoted and escaped (``\\``, ``"``, control characters as C
    escapes, ``%`` as ``%%``, ``$`` as ``$$``), so empty arguments, spaces, quotes,
    ``;``, ``$HOME`` and ``%n`` all reach the program unchanged. ``argv[0]`` is the
    program: an absolute path, or a bare name that systemd looks up in its fixed search
    path. With ``ignore_failure``, the line gets systemd's ``-`` prefix (a failure of
    the command is recorded but ignored).

    Raises ``ValueError`` for an empty argv, a NUL (or other character systemd cannot
    carry) in any argument, or an ``argv[0]`` that systemd would not run as given
    (starting with one of ``-@:+!``, containing quotes, backslashes or control
    characters, a relative path with ``/``, or ``;``).
    """
    if isinstance(argv, str):
        raise TypeError("argv must be a sequence of arguments, not a single string")
    args = list(argv)
    if not args:
        raise ValueError("argv is empty")
    for i, arg in enumerate(args):
        if not isinstance(arg, str):
            raise TypeError(f"argv[{i}] is {type(arg).__name__}, not str")
        _check_chars(arg, f"argv[{i}]")
    _check_executable(args[0])

    prefix = "-" if ignore_failure else ""
    words: list[str] = []
    if "$" in args[0]:
        # The executed path is not $-expanded, argv[0] is: give them separately ("@").
        words.append(_quote_word(prefix + "@" + args[0], dollar=False))
        words.append(_quote_word(args[0], dollar=True))
    else:
        words.append(_quote_word(prefix + args[0], dollar=True))
    words.extend(_quote_word(arg, dollar=True) for arg in args[1:])
    return _check_length(" ".join(words), "the command line")


def environment_assignment(key: str, value: str) -> str:
    """One double-quoted ``"KEY=value"`` word for ``Environment=``.

    ``%`` is written ``%%``; backslash, double quote and characters that are not
    printable are C-escaped. ``$`` is left alone: systemd does not expand variables in
    ``Environment=``. Several results may be joined with spaces on one line.

    Raises ``ValueError`` unless ``key`` matches ``[A-Za-z_][A-Za-z0-9_]*``, and for a
    value with a NUL (or another character systemd cannot carry).
    """
    if not _ENV_NAME.fullmatch(key):
        raise ValueError(
            f"invalid environment variable name {key!r} (must match [A-Za-z_][A-Za-z0-9_]*)"
        )
    _check_chars(value, f"the value of {key}")
    return _check_length(_quote_word(f"{key}={value}", dollar=False), f"the assignment of {key}")


# What a backslash must protect inside double quotes in an environment file: systemd's
# reader (parse_env_file_internal) unescapes exactly these and keeps any other "\".
_ENV_FILE_ESCAPE = re.compile(r'(["\\`$])')


def environment_file_line(key: str, value: str) -> str:
    """``KEY="value"`` and a newline, for a file that ``EnvironmentFile=`` names.

    The value is double-quoted, with ``"``, ``\\``, a backquote and ``$`` escaped by a
    backslash; inside double quotes systemd's reader keeps everything else as it is,
    line breaks included, and expands nothing. Raises ``ValueError`` as
    ``environment_assignment`` does."""
    if not _ENV_NAME.fullmatch(key):
        raise ValueError(
            f"invalid environment variable name {key!r} (must match [A-Za-z_][A-Za-z0-9_]*)"
        )
    _check_chars(value, f"the value of {key}")
    escaped = _ENV_FILE_ESCAPE.sub(r"\\\1", value)
    return f'{key}="{escaped}"\n'


def _check_line_chars(s: str, what: str) -> None:
    """Checks for text that must stay on its line."""
    _check_chars(s, what)
    for ch in s:
        if unicodedata.category(ch) in {"Cc", "Zl", "Zp"}:
            raise ValueError(f"{what} contains the control character {ch!r}")


def _check_verbatim(s: str, what: str) -> None:
    """Checks for a value that systemd takes verbatim up to the end of the line."""
    _check_line_chars(s, what)
    if s != s.strip(_SYSTEMD_WHITESPACE):
        raise ValueError(f"{what} has leading or trailing whitespace, which systemd strips")
    escaped = False
    for ch in s:
        escaped = not escaped and ch == "\\"
    if escaped:
        raise ValueError(
            f"{what} ends in an unpaired backslash, which systemd reads as a line continuation"
        )


def quote_value(s: str) -> str:
    """``s`` for a setting that takes its whole value verbatim and expands specifiers.

    For ``Description=``, ``SyslogIdentifier=``, ``User=``, ``Group=`` and the like (see
    the module docstring); not for settings that unquote or split their value. Only
    ``%`` needs escaping (as ``%%``): quotes and backslashes are taken literally there.

    Raises ``ValueError`` for an empty value (which would reset the setting instead),
    control characters (newline, tab, ...), leading or trailing whitespace (systemd
    strips it), a trailing unpaired backslash (systemd joins the next line), and
    characters systemd cannot carry. Whether the value is valid for the particular
    setting (say, a user name for ``User=``) is left to the caller.
    """
    if not s:
        raise ValueError("the value is empty (an empty assignment resets the setting)")
    _check_verbatim(s, "the value")
    return _check_length(s.replace("%", "%%"), "the value")


def inner_value(s: str) -> str:
    """``s`` for the middle of a verbatim value such as ``Description=`` (text the
    template writes surrounds it, so its ends may be spaces or a backslash): ``%``
    becomes ``%%``. Raises ``ValueError`` for what no line can carry (NUL, control
    characters, line separators, surrogates, noncharacters)."""
    _check_line_chars(s, "the value")
    return _check_length(s.replace("%", "%%"), "the value")


def path_value(path: str) -> str:
    """``path`` for a setting that takes one absolute path verbatim.

    For ``WorkingDirectory=``, ``EnvironmentFile=``, and ``StandardOutput=`` /
    ``StandardError=`` after ``append:``/``file:``/``truncate:`` (the result is to be put
    right after that prefix). systemd takes these verbatim: spaces, quotes and
    backslashes inside the path are fine and are not escaped; ``%`` is written ``%%``.

    Raises ``ValueError`` unless the path is absolute and normalised (no ``.`` or ``..``
    components, no repeated or trailing ``/``), fits PATH_MAX and NAME_MAX, and has no
    control characters, no trailing whitespace and no trailing unpaired backslash.
    """
    if not path.startswith("/"):
        raise ValueError(f"the path {path!r} is not absolute")
    if path.startswith("//") or posixpath.normpath(path) != path:
        raise ValueError(f"the path {path!r} is not normalised")
    _check_verbatim(path, f"the path {path!r}")
    if len(path.encode("utf-8")) >= _PATH_MAX:
        raise ValueError("the path is too long")
    for part in path.split("/"):
        if len(part.encode("utf-8")) > _NAME_MAX:
            raise ValueError(f"the path component {part[:20]!r}... is too long")
    return path.replace("%", "%%")


# sockaddr_un's sun_path holds 108 bytes, the terminating NUL included.
_SOCKET_PATH_MAX = 107


def listen_stream_path(path: str) -> str:
    """``ListenStream=`` (and ``SocketUser=`` & co. need nothing more) for a unix
    socket's path: absolute, normalised, at most 107 bytes, without blanks (systemd
    would read a socket path with them as something else); ``%`` is written ``%%``."""
    if len(path.encode("utf-8")) > _SOCKET_PATH_MAX:
        raise ValueError(f"a unix socket's path is at most {_SOCKET_PATH_MAX} bytes")
    if any(ch.isspace() for ch in path):
        raise ValueError("a unix socket's path must not contain blanks")
    return path_value(path)


def listen_stream(address: str, port: int) -> str:
    """``ListenStream=`` value for an IP literal and a port: ``127.0.0.1:8080``, ``[::1]:8080``.

    Raises ``ValueError`` for anything but an IPv4 or IPv6 address literal (host names,
    IPv6 scope IDs such as ``fe80::1%eth0``, which systemd refuses), and for a port
    outside 1..65535.
    """
    if not isinstance(address, str):
        raise TypeError(f"address must be a str, not {type(address).__name__}")
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int, not {type(port).__name__}")
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not in 1..65535")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{address!r} is not an IP address literal") from None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            raise ValueError(
                f"{address!r} has a scope ID, which ListenStream= does not accept "
                "(use BindToDevice=)"
            )
        return f"[{ip.compressed}]:{port}"
    return f"{ip.compressed}:{port}"
