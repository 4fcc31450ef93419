"""The conductor's default claim name: stable per instance, distinct per state directory."""

from __future__ import annotations

from pathlib import Path

from bootsvc.conductor import default_name
from bootsvc.config import Config


def _cfg(state: Path) -> Config:
    return Config.model_validate({"state_dir": str(state)})


def test_same_state_dir_same_name_across_restarts(tmp_path: Path) -> None:
    assert default_name(_cfg(tmp_path / "a"), 0) == default_name(_cfg(tmp_path / "a"), 0)


def test_instances_sharing_a_hostname_get_distinct_names(tmp_path: Path) -> None:
    # two instances in network namespaces of one machine: same hostname, own state directories
    a, b = default_name(_cfg(tmp_path / "a"), 0), default_name(_cfg(tmp_path / "b"), 0)
    assert a != b
    assert len(a) <= 128 and len(b) <= 128  # nodes.claimed_by is String(128)


def test_listener_index_still_distinguishes(tmp_path: Path) -> None:
    assert default_name(_cfg(tmp_path), 0) != default_name(_cfg(tmp_path), 1)
