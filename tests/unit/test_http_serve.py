"""bootsvc.web.serve: what each HTTP worker does once its app exists."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootsvc import config as cfgmod
from bootsvc.web import create_app
from bootsvc.web.serve import settle_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # give the test process's objects back to the collector


def test_settle_heap_takes_the_built_app_out_of_full_collections(tmp_path: Path, unfrozen: None) -> None:
    cfg = cfgmod.from_mapping({"database": {"url": f"sqlite:///{tmp_path}/db.sqlite"},
                               "state_dir": str(tmp_path / "state"),
                               "security": {"node_key_ref": f"file:{tmp_path}/node.key"}}, env={})
    app = create_app(cfg)
    gc.collect()  # count what is alive, not garbage that earlier tests left for the collector
    before = len(gc.get_objects())
    assert before > 10_000  # Flask + SQLAlchemy + Jinja: what a full collection would walk per worker

    assert settle_heap(app) is app
    assert gc.get_freeze_count() >= before * 9 // 10
    assert len(gc.get_objects()) < before // 10
    # per-request garbage is still collected after the freeze
    junk: list[object] = []
    junk.append(junk)
    del junk
    assert gc.collect() >= 1
