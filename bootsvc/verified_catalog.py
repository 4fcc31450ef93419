"""The image catalog as the boot servers use it: loaded and every file's sha256 verified once at start.

Owns: :func:`load_verified_catalog`, shared by the TFTP service (bootsvc/tftp/run.py) and the boot
HTTP plane, so neither protocol edge imports the other (tests/unit/test_architecture.py).
"""

from __future__ import annotations

import logging

from bootsvc import images as images_mod
from bootsvc.config import Config

log = logging.getLogger("bootsvc.images")


def load_verified_catalog(config: Config) -> images_mod.Catalog:
    """The catalog of ``config.images.catalog`` with files whose checksum fails marked unusable (each
    logged once); verification results are cached in ``<state_dir>/image-verify.json``."""
    cat = images_mod.load_catalog(config.resolve(config.images.catalog))
    cat, checks = images_mod.verify(cat, config.resolve(config.state_dir) / "image-verify.json")
    bad = [c for c in checks if not c.ok]
    for c in bad:
        log.error("image %s file %s (%s): %s", c.image, c.role, c.path, c.reason)
    log.info("image catalog %s: %d images, %d files checked, %d bad", cat.source, len(cat.images),
             len(checks), len(bad))
    return cat
