"""Where a study lives: an SQLAlchemy URL -> Optuna's RDBStorage, and a lock the workers share.

Optuna keeps trials consistent on its own (each trial is claimed and numbered under a row lock),
but two things need one process at a time: creating the tables in an empty PostgreSQL database
(concurrent ``CREATE TYPE`` fails) and "count the trials, add one if under budget" (otherwise two
workers can both see N-1 trials and run N+1). ``exclusive`` gives that, per database kind:
an advisory lock on PostgreSQL, a file lock beside an SQLite file.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import sqlalchemy
from optuna.storages import RDBStorage
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from tunepilot.errors import UserError

DEFAULT_FILE = "sweep.db"
# a worker writes a heartbeat this often while it runs a trial; a RUNNING trial whose last one
# is older than the grace period belongs to a dead process and is marked failed (its place in
# the budget goes to a new trial)
HEARTBEAT_S = 10
GRACE_S = 60
SQLITE_WAIT_S = 60  # workers sharing one SQLite file wait this long for its write lock


def default_url(out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / DEFAULT_FILE).resolve()}"


def parse(text: str) -> URL:
    """The URL with a driver SQLAlchemy can load; ``--storage`` errors name the flag."""
    try:
        url = make_url(text)
    except sqlalchemy.exc.ArgumentError:
        raise UserError(
            f"--storage {text}: not a database URL; expected e.g. sqlite:///sweep.db or "
            "postgresql://user:password@host:5432/dbname"
        ) from None
    # SQLAlchemy 2.1 defaults to psycopg 3; psycopg2 (the dev extra) is as good, so use
    # whichever is installed rather than fail on a bare postgresql:// URL
    if url.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is None:
            raise UserError(
                f"--storage {shown(url)}: no PostgreSQL driver installed; "
                "pip install psycopg2-binary (or psycopg)"
            )
        url = url.set(drivername="postgresql+psycopg2")
    return url


def shown(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def open_storage(url: URL) -> RDBStorage:
    """Connect (creating Optuna's tables on first use); unreachable or unknown -> UserError."""
    kwargs: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": SQLITE_WAIT_S}
    else:
        kwargs["pool_pre_ping"] = True  # a worker outlives server restarts and idle timeouts
    try:
        with exclusive(url, "schema"):
            return RDBStorage(
                url.render_as_string(hide_password=False),
                engine_kwargs=kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
            )
    except ImportError:
        raise UserError(
            f"--storage {shown(url)}: no driver for {url.drivername!r} installed"
        ) from None
    except sqlalchemy.exc.NoSuchModuleError:
        raise UserError(
            f"--storage {shown(url)}: unknown database kind {url.drivername!r}; use sqlite:// "
            "or postgresql:// (any SQLAlchemy URL works with its driver installed)"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as exc:  # OSError: the SQLite lock file
        remedy = (
            "check that its folder exists and is writable"
            if url.get_backend_name() == "sqlite"
            else "check that the server runs and the URL's host, port, user and password"
        )
        raise UserError(
            f"--storage {shown(url)}: cannot use it: {_first_line(exc)}; {remedy}"
        ) from None


@contextmanager
def exclusive(url: URL, name: str) -> Iterator[None]:
    """Hold a lock named ``name`` across every process using this database."""
    backend = url.get_backend_name()
    if backend == "postgresql":
        lock = _postgres_lock(url, name)
    elif backend == "sqlite" and url.database not in (None, "", ":memory:"):
        lock = _file_lock(Path(f"{url.database}.lock"))
    else:
        # other databases work, but without the lock concurrent workers may overshoot the
        # trial budget by one each
        lock = nullcontext()
    with lock:
        yield


@contextmanager
def _postgres_lock(url: URL, name: str) -> Iterator[None]:
    # a transaction-scoped advisory lock: released at commit, or by the server when a killed
    # worker's connection drops, so a crash never leaves it held
    key = int.from_bytes(hashlib.sha256(f"tunepilot:{name}".encode()).digest()[:8], signed=True)
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield
    finally:
        engine.dispose()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # flock is released by the kernel when the holder dies; SQLite files are local, so is this
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
