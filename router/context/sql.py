"""Read-only SQL mirrors: parameterised queries filled only by bound request metadata.

A mirror URL is ``sqlite:///relative/or/absolute.db`` (opened read-only with the standard
library) or any URL SQLAlchemy understands (used when SQLAlchemy is installed). Queries come
from the configuration; request values are only ever bound as parameters, never spliced in.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from router.config import LoadedConfig, SqlMirrorConfig
from router.errors import FailedPrecondition, InvalidArgument

SQLITE_PREFIX = "sqlite:///"

log = logging.getLogger("plexus.context")


class SqlMirror:
    """One mirror; ``query(sql, params, max_rows) -> (columns, rows)``; thread-safe."""

    def __init__(self, name: str, config: SqlMirrorConfig, loaded: LoadedConfig):
        self.name = name
        self.config = config
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._engine: Any = None
        if config.url.startswith(SQLITE_PREFIX):
            self.path = loaded.resolve(Path(config.url[len(SQLITE_PREFIX) :]))
        else:
            self.path = None

    def _sqlite(self) -> sqlite3.Connection:
        if self._connection is None:
            if not self.path or not self.path.is_file():
                log.error("SQL mirror %s: no database at %s", self.name, self.path)
                raise FailedPrecondition(
                    f"SQL mirror {self.name!r} has no database yet (the server log names the file)"
                )
            self._connection = sqlite3.connect(
                f"file:{self.path}?mode=ro",
                uri=True,
                check_same_thread=False,
                timeout=self.config.timeout_seconds,
            )
        return self._connection

    def _sqlalchemy(self) -> Any:
        if self._engine is None:
            try:
                import sqlalchemy
            except ImportError:
                raise FailedPrecondition(
                    f"SQL mirror {self.name!r}: URL {self.config.url!r} needs SQLAlchemy "
                    f"(pip install sqlalchemy and the database's driver)"
                ) from None
            self._engine = sqlalchemy.create_engine(self.config.url, pool_pre_ping=True)
        return self._engine

    def query(
        self, sql: str, params: Mapping[str, str], max_rows: int
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        if self.path is not None:
            with self._lock:
                connection = self._sqlite()
                deadline = time.monotonic() + self.config.timeout_seconds
                connection.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
                try:
                    cursor = connection.execute(sql, dict(params))
                    rows = cursor.fetchmany(max_rows)
                    columns = [d[0] for d in cursor.description or ()]
                except sqlite3.OperationalError as exc:
                    raise FailedPrecondition(f"SQL mirror {self.name!r}: {exc}") from None
                finally:
                    connection.set_progress_handler(None, 0)
            return columns, rows
        import sqlalchemy

        with self._sqlalchemy().connect() as connection:
            result = connection.execute(sqlalchemy.text(sql), dict(params))
            return list(result.keys()), [tuple(r) for r in result.fetchmany(max_rows)]

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
        if self._engine is not None:
            self._engine.dispose()


def bind_parameters(
    route: str, names: Sequence[str], metadata: Mapping[str, str]
) -> dict[str, str]:
    """The query's parameters from request metadata; a missing one is INVALID_ARGUMENT."""
    missing = [name for name in names if not metadata.get(name)]
    if missing:
        raise InvalidArgument(
            f"route {route!r} needs request metadata {missing} for its SQL context source"
        )
    return {name: metadata[name] for name in names}


def render_rows(columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> str:
    """Rows as one compact table: a header line, then one line per row."""
    if not rows:
        return "(no rows)"
    lines = [" | ".join(columns)]
    lines += [" | ".join("" if v is None else str(v) for v in row) for row in rows]
    return "\n".join(lines)
