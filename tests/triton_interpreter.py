"""Triton's CPU interpreter for the kernel test modules, without leaking it into the others.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, and this project's launchers read it at each
call, so a kernel test module imports the kernels inside :func:`interpreted` and runs its tests under it
(an autouse module fixture); other test modules, and their subprocesses, see the environment unchanged.
"""

import contextlib
import os


@contextlib.contextmanager
def interpreted():
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
