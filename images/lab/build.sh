#!/bin/sh
# Build (or reuse from the cache) the lab boot artifacts; see bootsvc/lab/artifacts.py and README.md here.
#   images/lab/build.sh [--doca] [--wheel] [--refresh] [--cache DIR]
# Cache: $BOOTSVC_LAB_CACHE or /var/cache/bootsvc-lab. Needs root (debootstrap, mke2fs -d), apt, dpkg,
# grub-common (grub-mkimage), cpio, busybox-static is fetched with apt-get download.
set -eu
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m bootsvc.lab.artifacts "$@"
