"""Statement recording for the tests that count what a code path sends to the database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import sessionmaker


@contextmanager
def statements(bind: Engine | Connection | sessionmaker[Any]) -> Iterator[list[str]]:
    """Every statement the engine (a connection, a session factory's engine) sends while inside, in order, as
    ``before_cursor_execute`` sees it, whitespace collapsed to single spaces; the listener is removed
    on the way out."""
    engine: Engine | Connection = bind.kw["bind"] if isinstance(bind, sessionmaker) else bind
    sent: list[str] = []

    def one(_c: Any, _cur: Any, stmt: str, *_a: Any) -> None:
        sent.append(" ".join(stmt.split()))

    event.listen(engine, "before_cursor_execute", one)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", one)
