"""Whether the code that system units would run is root's alone to change.

Units of the system manager run lmproxy's own Python (the shims, the log tee) as the
`lmproxy` user, with its polkit rights, and the log tee as each backend's user, root
included. They run the interpreter and the package that `lmproxy install --system`
ran from: if another user can write to either (a clone in a home, a virtual
environment anyone may change), that user gets to run code as all of them. So, for
the system manager, every file and folder of the package, the interpreter, a virtual
environment's packages, and every folder above them must belong to root and be
writable by no group and no one else. A root-owned folder that is writable by all
but sticky (/tmp) passes on the way down: nobody else can replace what root put in
it. The packaged /usr/bin/lmproxy passes.
"""

from __future__ import annotations

import os
import site
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import lmproxy
from lmproxy.files import writable_by_others


class UntrustedCode(Exception):  # noqa: N818 (it is what callers check for)
    """Code that system units would run can be changed by someone other than root."""


def code_paths() -> list[Path]:
    """What system units of this lmproxy would execute or import."""
    paths = [Path(sys.executable), Path(lmproxy.__file__).parent]
    if sys.prefix != sys.base_prefix:  # a virtual environment: its packages too
        paths += [Path(p) for p in site.getsitepackages() if p.startswith(sys.prefix)]
    return paths


def problems(paths: Iterable[Path]) -> list[str]:
    """Why each path fails (one line each); empty when all are root's alone.
    Symbolic links are followed: the link, its folders and its target must all pass."""
    found: dict[Path, str] = {}
    for path in paths:
        for checked in _closure(path):
            if checked not in found:
                found[checked] = _problem(checked)
    return [f"{path}: {why}" for path, why in found.items() if why]


def require_root_owned_code() -> None:
    """Raises UntrustedCode, naming each path and what to do, unless code_paths() pass."""
    found = problems(code_paths())
    if found:
        shown = "\n  ".join(found[:10]) + (
            f"\n  ... and {len(found) - 10} more" if len(found) > 10 else ""
        )
        raise UntrustedCode(
            "refusing to install for the system manager: its units would run code that "
            f"users other than root can change:\n  {shown}\n"
            "Install lmproxy's package (the .deb or the AUR package) and run "
            "/usr/bin/lmproxy, or copy the checkout to a folder only root can write "
            "(for example `cp -r . /opt/lmproxy && chown -R root:root /opt/lmproxy && "
            "chmod -R go-w /opt/lmproxy`) and run /usr/bin/python3 -m lmproxy from there."
        )


def _closure(path: Path) -> Iterator[Path]:
    """path's folders from /, path itself, everything below it if it is a folder, and
    the same for the target of every symbolic link met on the way."""
    absolute = Path(os.path.abspath(path))
    for parent in reversed(absolute.parents):
        yield parent
        if parent.is_symlink():
            yield from _closure(parent.resolve())
    yield absolute
    if absolute.is_symlink():
        yield from _closure(absolute.resolve())
    elif absolute.is_dir():
        # __pycache__ included: Python loads a .pyc whose header matches its source.
        for folder, dirs, files in os.walk(absolute):
            for name in [*dirs, *files]:
                entry = Path(folder) / name
                yield entry
                if entry.is_symlink():
                    yield from _closure(entry.resolve())


def _problem(path: Path) -> str:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return ""  # a dangling link leads nowhere to run code from
    if stat.S_ISLNK(info.st_mode):
        return ""  # a link's own mode means nothing; its folder and target are checked
    if info.st_uid != 0:
        return f"owned by uid {info.st_uid}, not root"
    if writable_by_others(info):
        writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        who = "its group" if writable == stat.S_IWGRP else "others"
        return f"writable by {who} (mode {stat.S_IMODE(info.st_mode):04o})"
    return ""
