"""Bluetooth LE through the real Linux stack: one QEMU VM per test (see tests/vm/vm.py).

* f1: bleak's own BlueZ backend (no custom backend) finds, connects to and syncs with a
  bumble peer running Pigeon's GATT layout (tests/vm/scenario_bleak_bluez.py).
* f2: Pigeon's dbus-fast ``BluezPeripheral`` on BlueZ serves a bumble central that syncs
  with it (tests/vm/scenario_bluez_peripheral.py).

Run with ``make test-ble-vm``. Outside CI a missing QEMU, bluetoothd or unprepared kernel
cache skips with the reason; under CI=true it fails.
"""

from __future__ import annotations

import pytest

from tests.vm import vm

VM_TIMEOUT = vm.DEFAULT_VM_TIMEOUT

pytestmark = pytest.mark.timeout(VM_TIMEOUT + 60)


@pytest.fixture
def assets() -> vm.Assets:
    reason = vm.unavailable_reason()
    if reason is not None:
        if vm.in_ci():
            pytest.fail(f"CI=true and the BLE VM tier cannot run: {reason}")
        pytest.skip(reason)
    found = vm.find_assets()
    assert found is not None
    return found


def run_scenario(module: str, assets: vm.Assets) -> vm.VmResult:
    result = vm.run_vm(module, timeout=VM_TIMEOUT, assets=assets)
    print(f"\n{module}: VM run {result.seconds:.0f} s\n{result.scenario_log}")
    if result.rc != 0 or result.timed_out:
        pytest.fail(f"{module} failed in the VM\n{result.report()}", pytrace=False)
    # The exit status alone could come from a scenario that stopped early: its own last
    # words and the delivery check must be in the log too.
    assert "exactly once in each direction" in result.scenario_log
    assert result.scenario_log.rstrip().endswith("PASSED")
    return result


def test_bleak_bluez_backend_syncs_with_bumble_peripheral(assets: vm.Assets) -> None:
    result = run_scenario("tests.vm.scenario_bleak_bluez", assets)
    assert "BlueZ central linked to bob" in result.scenario_log


def test_bluez_peripheral_serves_bumble_central(assets: vm.Assets) -> None:
    result = run_scenario("tests.vm.scenario_bluez_peripheral", assets)
    assert "probe_bluez: /org/bluez/hci0" in result.scenario_log
    assert "bumble central linked to bob" in result.scenario_log
