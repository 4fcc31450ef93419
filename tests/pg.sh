#!/usr/bin/env bash
# A throwaway PostgreSQL for the test suite: its own cluster under $BOOTSVC_PG_DIR, listening on a
# unix socket there (reachable from inside network namespaces too) and on 127.0.0.1 only.
#   tests/pg.sh start   -> prints the URL to export as BOOTSVC_TEST_PG_URL
#   tests/pg.sh stop
set -euo pipefail
PGROOT=${BOOTSVC_PG_DIR:-/tmp/bootsvc-pg}
PORT=${BOOTSVC_PG_PORT:-55432}
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
[ -n "$BIN" ] || { echo "PostgreSQL server binaries not found (apt-get install postgresql)" >&2; exit 1; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
url="postgresql+psycopg://postgres@/postgres?host=${PGROOT}&port=${PORT}"
case "${1:-}" in
  start)
    mkdir -p "$PGROOT"
    [ "$(id -u)" = 0 ] && chown postgres: "$PGROOT"
    if [ ! -f "$PGROOT/data/PG_VERSION" ]; then
      as_pg "$BIN/initdb" -D "$PGROOT/data" -A trust -U postgres >/dev/null
    fi
    if ! as_pg "$BIN/pg_ctl" -D "$PGROOT/data" status >/dev/null 2>&1; then
      as_pg "$BIN/pg_ctl" -D "$PGROOT/data" -l "$PGROOT/server.log" -w -t 60 \
        -o "-k $PGROOT -p $PORT -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
    fi
    echo "$url"
    ;;
  stop)
    as_pg "$BIN/pg_ctl" -D "$PGROOT/data" -w -m fast stop >/dev/null 2>&1 || true
    ;;
  url) echo "$url" ;;
  *) echo "usage: $0 start|stop|url" >&2; exit 2 ;;
esac
