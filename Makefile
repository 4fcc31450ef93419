# bootsvc — the README's first two commands are `make demo` and `make test` (Debian 12, as root).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
BOOTSVC := $(VENV)/bin/bootsvc
PYTHON ?= python3

# Debian packages: the lab (QEMU, firmware, iPXE), real protocol peers for tests and benches, PostgreSQL.
APT_RUNTIME := iproute2 nftables python3-venv
APT_LAB := qemu-system-x86 qemu-system-arm qemu-utils ipxe ipxe-qemu ovmf qemu-efi-aarch64 busybox-static \
	grub-common cpio e2fsprogs debootstrap dosfstools mtools binutils frr \
	vagrant vagrant-libvirt libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients python3-libvirt
APT_TEST := postgresql isc-dhcp-client udhcpc isc-dhcp-relay kea-dhcp4-server kea-admin dnsmasq-base \
	tftpd-hpa tftp-hpa atftp nginx-light wrk curl tshark netcat-openbsd iputils-ping bridge-utils socat \
	chromium dnsutils unzip openssl kmod systemd frr frr-pythontools dhcpcd-base knot-dnsutils nmap tcpdump
APT_STAMP := /var/lib/bootsvc-apt.stamp

.PHONY: demo test deps apt venv lint types pytest pg-up pg-down migration docs bench clean lab-down

$(APT_STAMP): Makefile
	@command -v apt-get >/dev/null || { echo "apt-get not found: install the packages listed in the Makefile by hand"; exit 1; }
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		$(APT_RUNTIME) $(APT_LAB) $(APT_TEST)
	touch $@

apt: $(APT_STAMP)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# -- the main job: the embedded default (SQLite + an isolated lab network), API/UI on 127.0.0.1:8080
demo: apt venv
	$(BOOTSVC) --config config/lab.yaml lab demo

lab-down: venv
	$(BOOTSVC) --config config/lab.yaml lab down

# -- the tests: lint, types, then pytest against a PostgreSQL this target starts itself
test: apt venv
	$(VENV)/bin/ruff check bootsvc tests bench migrations/env.py
	$(VENV)/bin/mypy bootsvc
	BOOTSVC_TEST_PG_URL="$$(tests/pg.sh start)" $(VENV)/bin/pytest $(PYTEST_ARGS); \
		rc=$$?; tests/pg.sh stop; exit $$rc

lint: venv
	$(VENV)/bin/ruff check bootsvc tests bench migrations/env.py

types: venv
	$(VENV)/bin/mypy bootsvc

pg-up:
	@tests/pg.sh start

pg-down:
	@tests/pg.sh stop

# Regenerate the single initial migration from the models (allowed until the first release).
migration: venv
	rm -f /tmp/bootsvc-migration.db migrations/versions/0001_initial_schema.py
	$(VENV)/bin/alembic -c alembic.ini -x url=sqlite:////tmp/bootsvc-migration.db revision --autogenerate \
		-m "initial schema" --rev-id 0001 >/dev/null
	rm -f /tmp/bootsvc-migration.db
	@echo "regenerated migrations/versions/0001_initial_schema.py"

docs: venv
	$(PY) -m bootsvc.docs

# the storm's simulator runs on uvloop when installed (bench/storm/sim.py; its CPU counts in the target)
bench: apt venv
	$(PIP) install -q 'uvloop>=0.19'
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) var build *.egg-info
