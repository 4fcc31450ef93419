"""bootsvc_db_statements_total: every engine bootsvc makes counts the statements it sends, and the
series reaches /metrics with the service label (the storm harness's per-service SQL counts, built in)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from bootsvc import db, metrics
from bootsvc.web.metrics import render, with_labels


def test_every_statement_is_counted_and_exposed_per_service(tmp_path: Path) -> None:
    before = metrics.counters.get("bootsvc_db_statements_total")
    engine = db.make_engine(f"sqlite:///{tmp_path}/x.db")
    with engine.connect() as c:
        for i in range(3):
            c.execute(text(f"SELECT {i}"))
    engine.dispose()
    assert metrics.counters.get("bootsvc_db_statements_total") - before == 3
    samples = [s for s in metrics.counters.snapshot() if s.name == "bootsvc_db_statements_total"]
    out = render(with_labels(samples, {"service": "conductor", "instance": "0"}), metrics.CATALOG)
    assert "# TYPE bootsvc_db_statements_total counter" in out
    assert 'bootsvc_db_statements_total{instance="0",service="conductor"}' in out
