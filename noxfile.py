"""Developer tasks. ``nox`` alone runs the test suite (what CI runs).

* ``nox -s tests``     the suite, including the real llama-server (built once per machine)
* ``nox -s lint``      ruff
* ``nox -s typecheck`` mypy --strict
* ``nox -s demo``      swapd on tiny generated models, no GPU needed
* ``nox -s bench``     swapd versus talking to llama-server directly
"""

from __future__ import annotations

import shutil

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_external_run = True
# Without a usable Python, fail: by default nox would skip the session and exit 0.
nox.options.error_on_missing_interpreters = True

SUPPORTED = ("3.11", "3.12", "3.13", "3.14")


def _oldest_supported() -> str:
    """The oldest supported Python on this machine (3.11 if none: nox then says so)."""
    return next((v for v in SUPPORTED if shutil.which(f"python{v}")), SUPPORTED[0])


PYTHON = _oldest_supported()


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    # Separate step so a first-time build (~8 minutes) shows its own progress.
    session.run("python", "tests/support/llama_build.py")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "swapd", "tests", "bench", "noxfile.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy", "types-PyYAML")
    session.run("mypy")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("python", "-m", "tests.support.demo")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """``nox -s bench -- --quick`` (under a minute) or without it (a few minutes).

    py-spy is only used by ``--profile`` (it samples the running swapd); wrk, if the
    system has it (``apt-get install wrk``), adds a cross-check of the latency figures.
    """
    session.install("-e", ".[test]", "py-spy")
    session.run("python", "-m", "bench", *session.posargs)
