"""Where the files bootsvc reads at run time live: the iPXE/GRUB/bf.cfg templates and the Alembic migrations.

Owns: one answer to "where is ``ipxe/`` / ``migrations/``" for every caller. In an installed wheel both are
package data under ``bootsvc/_data/`` (``pyproject.toml`` maps the top-level directories there with
hatchling's ``force-include``, so the repository layout stays as it is); in a source tree (``make``'s
editable install, tests) they are the top-level ``ipxe/`` and ``migrations/`` beside the package.
Pure: path arithmetic and one ``is_dir`` check per lookup, no other I/O.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """``bootsvc/_data/<name>`` when the wheel carries it, else ``<source tree>/<name>``."""
    shipped = _PACKAGE / "_data" / name
    if shipped.is_dir():
        return shipped
    return _PACKAGE.parent / name


def templates_dir() -> Path:
    return data_dir("ipxe")


def migrations_dir() -> Path:
    return data_dir("migrations")
