# Every target builds .venv first, so a fresh machine needs only python3.11+ and make.
# The first interpreter that actually runs and is 3.11+ (pyenv shims may exist but fail).
PY ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && { command -v $$p; break; }; \
	done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run relay test test-soak test-ble-vm check lint types bench fuzz clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The chat window on the default profile. On first run it creates your identity; if a
# relay already runs on the profile it attaches to it. Ctrl+Q quits (the relay stays).
run: $(STAMP)
	$(BIN)/pigeon chat

# A headless relay on the default profile (what `make run` started before the chat window).
relay: $(STAMP)
	@$(BIN)/pigeon id >/dev/null 2>&1 || $(BIN)/pigeon init --name "$${USER:-me}"
	$(BIN)/pigeon relay

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The slow tier: the full 100,000-envelope flood against a relay process.
test-soak: $(STAMP)
	PIGEON_FLOOD_N=100000 $(BIN)/python -m pytest -q -p no:cacheprovider -s tests/test_flood.py

# The BLE VM tier: QEMU boots Debian's kernel with dbus-daemon and bluetoothd inside, so
# bleak's BlueZ backend and Pigeon's BlueZ peripheral run for real (docs/ble.md, "The VM
# tier"). Needs qemu-system-x86, bluez, kmod, busybox-static, cpio; the kernel and
# initramfs are prepared once into .cache/ble-vm/ (apt-get download). ~2 min per test.
test-ble-vm: $(STAMP)
	$(BIN)/python -m tests.vm.vm prepare
	PIGEON_VM_TESTS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -s tests/vm $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check mesh tui tests fuzz bench

types: $(STAMP)
	$(BIN)/mypy

check: lint types test

# Every benchmark in bench/: JSON and PNG plots into docs/benchmarks/, then the summary
# table in docs/benchmarks/README.md. Bench-only dependencies (matplotlib, rns, lxmf,
# pyinstrument) come from the `bench` extra. Reticulum runs loopback-only (see bench/lxmf_peer.py).
BENCHES := sync_cost relay_load sim_policies lxmf_compare ble_goodput
bench: $(STAMP)
	$(BIN)/pip install -q -e '.[test,bench]'
	@failed=""; for b in $(BENCHES); do echo "== $$b"; $(BIN)/python -m bench.$$b || failed="$$failed $$b"; done; \
		$(BIN)/python -m bench.summary; \
		if [ -n "$$failed" ]; then echo "failed:$$failed"; exit 1; fi

# Coverage-guided fuzzing of every decoder; FUZZ_RUNS inputs per target (atheris).
FUZZ_RUNS ?= 1000000
FUZZ_TARGETS := frame envelope receipt contact invite plaintext stream session reconcile
fuzz: $(STAMP)
	$(BIN)/pip install -q atheris
	@for t in $(FUZZ_TARGETS); do \
		echo "== $$t"; \
		$(BIN)/python fuzz/fuzz_decoders.py $$t -runs=$(FUZZ_RUNS) -print_final_stats=1 2>&1 \
			| grep -E "^(Done|stat::number_of_executed_units|==.*ERROR)" || exit 1; \
	done

clean:
	rm -rf $(VENV) build dist *.egg-info
