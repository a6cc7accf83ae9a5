"""The C part of lmproxy: everything else is declared in pyproject.toml.

lmproxy._fastcopy copies the relay's small messages without the interpreter (see
lmproxy/_fastcopy.c) and follows their HTTP/1.1 framing (lmproxy/_exchange.c). It is
optional: where it cannot be built (no C compiler or no Python headers) the install goes
on, and the relay does both in Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lmproxy._fastcopy",
            sources=["lmproxy/_fastcopy.c", "lmproxy/_exchange.c"],
            depends=["lmproxy/_exchange.h"],
            extra_compile_args=["-Wall", "-Wextra"],
            optional=True,
        )
    ]
)
