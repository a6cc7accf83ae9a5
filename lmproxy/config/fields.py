"""The readers of the fields that are read in their own way: names, sockets, commands,
paths, resources, users. Each is named in a table of lmproxy.config.settings."""

from __future__ import annotations

import re
import shlex

from lmproxy import unitsyntax
from lmproxy.config.jsonc import JsonObject, child, show
from lmproxy.config.kinds import (
    DEFAULT_HEALTHCHECK_INTERVAL_MS,
    DEFAULT_LISTEN_ADDRESS,
    DEFAULT_PROXY_TARGET_HOST,
    MAX_MILLISECONDS,
    MAX_NAME_LENGTH,
    MAX_RESOURCE_AMOUNT,
    MAX_SECONDS,
    SHIM_USER,
    ConfigReader,
    Defaults,
    ReadOne,
    Values,
    given,
)
from lmproxy.config.reader import Fields, absolute, ip_literal

# All used with fullmatch().
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SOCKET_MODE_RE = re.compile(r"0?[0-7]{3}")


def service_name(r: ConfigReader, f: Fields, _v: Values, _d: Defaults | None) -> Values:
    """Any name, as large-model-proxy takes it: its units get a unit-safe form of it
    (unitnames.component), while status, logs and the APIs show it as written."""
    name = r.text(f, "Name")
    if name is None:
        if not f.has("Name"):
            r.error(f.path_of("Name"), "Name is required")
        return {"name": None}
    problem = None
    if not name:
        problem = "Name must not be empty"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"Name is longer than {MAX_NAME_LENGTH} characters"
    else:
        try:  # where the name is written verbatim: each unit's Description=
            unitsyntax.inner_value(name)
        except ValueError as error:
            problem = f"Name {show(name)} is not usable in a systemd unit: {error}"
    if problem is not None:
        r.error(f.path_of("Name"), problem)
        return {"name": None}
    return {"name": name}


def unix_socket(r: ConfigReader, f: Fields, _v: Values, _d: Defaults | None) -> Values:
    """ListenPath and who may connect to it: SocketUser, SocketGroup, SocketMode."""
    path = r.optional_text(f, "ListenPath")
    if path is not None:
        r.unit_safe(f, "ListenPath", lambda: unitsyntax.listen_stream_path(path))
    owners = [
        r.account(f, "SocketUser", "a user name"),
        r.account(f, "SocketGroup", "a group name"),
    ]
    mode = r.optional_text(f, "SocketMode")
    if mode is not None and not _SOCKET_MODE_RE.fullmatch(mode):
        r.error(
            f.path_of("SocketMode"),
            f'invalid SocketMode {show(mode)}: expected an octal mode such as "0660"',
        )
        mode = None
    for name, value in (
        ("SocketUser", owners[0]),
        ("SocketGroup", owners[1]),
        ("SocketMode", mode),
    ):
        if value is not None and path is None:
            r.error(f.path_of(name), f"{name} needs a ListenPath")
    return {
        "listen_path": path,
        "socket_user": owners[0],
        "socket_group": owners[1],
        "socket_mode": mode,
    }


def listen_port(r: ConfigReader, f: Fields, v: Values, _d: Defaults | None) -> Values:
    by_path = v["listen_path"] is not None
    # Neither (a service reachable only through the router) is checked by the parser, which
    # knows the service's OpenAiApi and the top level's.
    port = r.port(f, "ListenPort")
    if port is not None and by_path:
        r.error(
            f.path_of("ListenPath"),
            "a service listens on a ListenPort or on a ListenPath, not both",
        )
    return {"listen_port": port}


def listen_address(r: ConfigReader, f: Fields, name: str, _v: Values, d: Defaults | None) -> object:
    return r.address(f, name, given(d).listen_address if d is not None else DEFAULT_LISTEN_ADDRESS)


def proxy_target_host(r: ConfigReader, f: Fields, _v: Values, _d: Defaults | None) -> Values:
    host = r.text(f, "ProxyTargetHost")
    if host is None:
        return {
            "proxy_target_host": None if f.has("ProxyTargetHost") else DEFAULT_PROXY_TARGET_HOST
        }
    if host == "":
        return {"proxy_target_host": DEFAULT_PROXY_TARGET_HOST}
    address = ip_literal(host)
    if address is not None:
        return {"proxy_target_host": address}
    if _HOSTNAME_RE.fullmatch(host):
        return {"proxy_target_host": host}
    r.error(
        f.path_of("ProxyTargetHost"),
        f"expected a host name or an IP address (no brackets, no port), got {show(host)}",
    )
    return {"proxy_target_host": None}


def required_port(message: str) -> ReadOne:
    return lambda r, f, name, _v, _d: r.port(f, name, required=message)


def path(r: ConfigReader, f: Fields, name: str, _v: Values, _d: Defaults | None) -> object:
    """A path; a relative one is taken from the base directory (where install ran)."""
    value = r.optional_text(f, name)
    return None if value is None else absolute(r.base_dir, value)


def log_file_path(r: ConfigReader, f: Fields, name: str, v: Values, d: Defaults | None) -> object:
    value = path(r, f, name, v, d)
    if value == "/":
        r.error(f.path_of(name), "LogFilePath must name a file, not '/'")
    return value


def command(r: ConfigReader, f: Fields, v: Values, _d: Defaults | None) -> Values:
    """Command: a bare name (systemd looks it up in PATH), or a path, relative to WorkDir
    (where large-model-proxy's child would find it) or else to the base directory."""
    text = r.text(f, "Command")
    if text is None:
        if not f.has("Command"):
            r.error(f.path_of("Command"), "Command is required")
        return {"command": None}
    if not text.strip():
        r.error(f.path_of("Command"), f"Command must not be empty, got {show(text)}")
        return {"command": None}
    if "/" not in text:
        return {"command": text}
    work_dir = v["work_dir"]
    assert work_dir is None or isinstance(work_dir, str)
    return {"command": absolute(work_dir or r.base_dir, text)}


def args(r: ConfigReader, f: Fields, v: Values, _d: Defaults | None) -> Values:
    """Args: one string, split like a POSIX shell would (no shell runs)."""
    text = r.text(f, "Args") or ""
    try:
        split = shlex.split(text, posix=True)
    except ValueError as error:
        r.error(f.path_of("Args"), f"cannot split {show(text)} like a POSIX shell: {error}")
        split = []
    command_value = v["command"]
    argv = None if command_value is None else (command_value, *split)
    return {"args": text, "argv": argv}


def healthcheck_interval(r: ConfigReader, f: Fields, v: Values, _d: Defaults | None) -> Values:
    """0 means the default, as in large-model-proxy; a positive one needs a command."""
    name = "HealthcheckIntervalMilliseconds"
    interval = r.integer(f, name, 0, MAX_MILLISECONDS, 0)
    if interval > 0 and v["healthcheck_command"] is None:
        r.error(f.path_of(name), f"{name} is set but there is no HealthcheckCommand")
    return {"healthcheck_interval_ms": interval or DEFAULT_HEALTHCHECK_INTERVAL_MS}


def service_shutdown(
    r: ConfigReader, f: Fields, name: str, _v: Values, d: Defaults | None
) -> object:
    """0 (or absent) takes the top level's."""
    own = r.integer(f, name, 0, MAX_SECONDS, 0)
    return own if own > 0 else given(d).shutdown_s


def service_url(r: ConfigReader, f: Fields, name: str, _v: Values, d: Defaults | None) -> object:
    """Where the status page links a service: DefaultServiceUrl when absent, none when
    null or "", as large-model-proxy has it ({{.PORT}} is filled in when shown)."""
    if f.is_null(name):
        return None
    if not f.has(name):
        return given(d).service_url
    return r.optional_text(f, name)


def strings(r: ConfigReader, f: Fields, name: str) -> list[tuple[str, str]]:
    """An array of strings: each valid one with its JSON path (the others are reported)."""
    got = f.get(name)
    if got is None:
        return []
    where, value = got
    if not isinstance(value, list):
        r.error(where, f"expected an array of strings, got {show(value)}")
        return []
    found = []
    for index, item in enumerate(value):
        text = r.string_value(f"{where}[{index}]", item)
        if text is not None:
            found.append((f"{where}[{index}]", text))
    return found


def models(r: ConfigReader, f: Fields, name: str, _v: Values, _d: Defaults | None) -> object:
    return tuple(model for _, model in strings(r, f, name))


def requirements(r: ConfigReader, f: Fields, name: str, _v: Values, _d: Defaults | None) -> object:
    got = r.object_field(f, name)
    return {} if got is None else amounts(r, *got)


def amounts(r: ConfigReader, where: str, obj: JsonObject) -> dict[str, int]:
    """Resource amounts, each in ResourcesAvailable and at most what it says."""
    needs: dict[str, int] = {}
    for key, value in obj.pairs:
        key_path = child(where, key)
        if key in needs:
            r.error(key_path, f"duplicate resource {show(key)}")
            continue
        amount = r.int_value(key_path, value, 0, MAX_RESOURCE_AMOUNT)
        if amount is None:
            continue
        needs[key] = amount
        if not r.resources_known or key in r.bad_resources:
            continue  # already reported at ResourcesAvailable
        available = r.resources.get(key)
        if available is None:
            r.error(key_path, f"resource {show(key)} is not in ResourcesAvailable")
        elif amount > available:
            r.error(key_path, f"needs {amount} of {show(key)} but only {available} is available")
    return needs


def environment(r: ConfigReader, f: Fields, name: str, _v: Values, _d: Defaults | None) -> object:
    got = r.object_field(f, name)
    if got is None:
        return {}
    where, obj = got
    variables: dict[str, str] = {}
    for key, value in obj.pairs:
        key_path = child(where, key)
        if key in variables:
            r.error(key_path, f"duplicate variable {show(key)}")
        elif not _ENV_NAME_RE.fullmatch(key):
            r.error(
                key_path,
                f"invalid variable name {show(key)}: expected letters, digits and '_', "
                "not starting with a digit",
            )
        else:
            text = r.string_value(key_path, value)
            if text is not None:
                variables[key] = text
    return variables


def user(r: ConfigReader, f: Fields, _v: Values, _d: Defaults | None) -> Values:
    name = r.account(f, "User", "a user name")
    allow_root = r.boolean(f, "AllowRoot", False)
    if name == SHIM_USER:
        r.error(
            f.path_of("User"),
            f"User {show(name)} is the shims' own user: a model server running as it "
            "could start and stop every model (polkit) and rewrite the resource ledger; "
            "leave User out (models then run as lmproxy-model) or name another user",
        )
    elif name == "root" and not allow_root:
        r.error(
            f.path_of("User"),
            'User "root" runs a network-facing model server with every privilege; '
            'if that is really meant, say so with "AllowRoot": true in this service',
        )
    return {"user": name}


def accepted(r: ConfigReader, f: Fields, name: str, _v: Values, _d: Defaults | None) -> object:
    """LogLevel: a string, read and checked, with no meaning here."""
    return r.text(f, name)


_MODEL_OPTIONS = ("-m", "--model")
_CONTEXT_OPTIONS = ("-c", "--ctx-size")
_SPLIT_OPTIONS = ("-ts", "--tensor-split", "-ngl", "--gpu-layers", "--n-gpu-layers")


def _option(argv: tuple[str, ...], names: tuple[str, ...]) -> str | None:
    """The value of an option of argv, given as `-m X`, `--model X` or `--model=X`; the
    last one, as llama-server reads its options."""
    for i in range(len(argv) - 1, 0, -1):
        arg = argv[i]
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
        name, equals, value = arg.partition("=")
        if equals and name in names:
            return value
    return None


def tensor_split(r: ConfigReader, f: Fields, v: Values, _d: Defaults | None) -> Values:
    """ "TensorSplit": "auto": llama.cpp's split computed at each start from the model file
    its Args name (-m/--model) and the GPUs' free memory then; so its Args must name
    one, and neither its Args nor its Environment may set the split themselves."""
    off: Values = {"split_model": None, "split_context": None}
    got = f.get("TensorSplit")
    if got is None:
        return off
    where, value = got
    if value != "auto":
        r.error(where, f'expected "auto" or null, got {show(value)}')
        return off
    argv = v["argv"]
    if not isinstance(argv, tuple):
        return off  # Command or Args are wrong, and said so
    model = _option(argv, _MODEL_OPTIONS)
    if model is None:
        r.error(where, "TensorSplit needs the model file in Args (-m PATH or --model PATH)")
        return off
    present = [a.partition("=")[0] for a in argv if a.partition("=")[0] in _SPLIT_OPTIONS]
    if present:
        r.error(where, f"TensorSplit computes the split: leave {present[0]} out of Args")
    environment = v["environment"]
    if isinstance(environment, dict) and "CUDA_VISIBLE_DEVICES" in environment:
        r.error(
            where,
            "TensorSplit chooses the GPUs: leave CUDA_VISIBLE_DEVICES out of Environment",
        )
    context = _option(argv, _CONTEXT_OPTIONS)
    work_dir = v["work_dir"]
    return {
        "split_model": absolute(str(work_dir) if work_dir else r.base_dir, model),
        "split_context": int(context) if context is not None and context.isdigit() else None,
    }
