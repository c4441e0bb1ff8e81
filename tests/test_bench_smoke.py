"""Every benchmark runs once at a tiny size, so ``make bench`` cannot rot unnoticed.

The figures are not checked against goals here (tiny sizes say nothing about them); what
is checked is that each benchmark runs end to end and produces its goal rows. The LXMF
comparison needs the bench-only ``rns``/``lxmf`` packages and is skipped without them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bench import ble_goodput, lxmf_compare, relay_load, sim_policies, summary, sync_cost
from bench.common import write_json


def test_sync_cost_tiny() -> None:
    data = sync_cost.run(tiny=True)
    assert data["rows"] and all(r["round_trips"] >= 1 for r in data["rows"])
    assert {g["goal"] for g in data["goals"]} >= {"in sync: round trips"}


def test_relay_load_tiny() -> None:
    data = relay_load.run(tiny=True)
    assert data["loaded"]["full_sync_s"] is not None
    assert data["loaded"]["rss_mb_peak"] > 0 and len(data["goals"]) == 2


def test_sim_policies_tiny() -> None:
    data = sim_policies.run(tiny=True)
    assert set(data["results"]["tiny"]) == {"epidemic", "spray-and-wait", "pigeon", "pigeon-budget"}
    assert len(data["goals"]) == 4


def test_ble_goodput_tiny() -> None:
    data = ble_goodput.run(tiny=True)
    for mtu in ("23", "517"):
        result = data["results"][mtu]
        assert result["raw_goodput_Bps"] > 0 and result["link_goodput_Bps"] > 0
        assert result["session"][0]["messages"] >= 1
    assert len(data["goals"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("RNS") is None or importlib.util.find_spec("LXMF") is None,
                    reason="rns/lxmf are bench-only dependencies")
def test_lxmf_compare_tiny() -> None:
    data = lxmf_compare.run(tiny=True)
    assert data["lxmf"]["latency"]["received"] == 3
    assert data["pigeon"]["latency"]["received"] == 2
    assert len(data["goals"]) == 4


def test_lxmf_config_is_loopback_only(tmp_path: Path) -> None:
    """The guard that keeps Reticulum off real interfaces refuses anything else."""
    if importlib.util.find_spec("RNS") is None:
        pytest.skip("the check parses the config with Reticulum's own parser")
    from bench.lxmf_peer import check_config, write_config

    check_config(write_config(tmp_path / "ok", server_port=4242, client_port=None))
    bad = write_config(tmp_path / "bad", server_port=4242, client_port=None)
    bad.write_text(bad.read_text() + "  [[Default Interface]]\n    type = AutoInterface\n")
    with pytest.raises(SystemExit, match="refusing"):
        check_config(bad)
    wide = write_config(tmp_path / "wide", server_port=4242, client_port=None)
    wide.write_text(wide.read_text().replace("127.0.0.1", "0.0.0.0"))
    with pytest.raises(SystemExit, match=r"not on 127\.0\.0\.1"):
        check_config(wide)


def test_summary_states_every_goal(tmp_path: Path) -> None:
    write_json(tmp_path, "sync_cost", {"goals": [
        {"goal": "in sync: round trips", "limit": 1, "measured": 1, "met": True},
        {"goal": "a figure to report", "limit": None, "measured": 7, "met": False,
         "report_only": True}]})
    write_json(tmp_path, "lxmf_compare", {"skipped": "rns not installed", "goals": []})
    text = summary.render(tmp_path)
    assert "| Sync cost (reconciliation) | in sync: round trips | 1 | 1 | yes |" in text
    assert "| a figure to report | n/a | 7 | reported, no goal |" in text
    assert "not measured: rns not installed" in text
    assert "not measured: `relay_load.json` missing" in text
