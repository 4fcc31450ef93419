"""Moved to ``tests/helpers/conductor.py`` (shared helpers belong in tests/helpers, not in a test file).
This re-export keeps the test files that still import it by its old bare name working until their
import lines change to ``from helpers.conductor import ...``; import from there in new code."""

from __future__ import annotations

from helpers.conductor import (
    TENANT,
    Agent,
    Installer,
    add_token,
    app_for,
    dpu_ids_of,
    enroll_machine,
    make_db,
    node,
    node_secret,
    site_config,
    site_tree,
    state,
    wait_for,
    write_erase_catalog,
    zone0_address,
)

__all__ = ["TENANT", "Agent", "Installer", "add_token", "app_for", "dpu_ids_of", "enroll_machine", "make_db", "node",
           "node_secret", "site_config", "site_tree", "state", "wait_for", "write_erase_catalog", "zone0_address"]
