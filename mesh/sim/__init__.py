"""A discrete-event simulator over the real Pigeon protocol code.

``engine`` runs one real ``LinkSession`` pair per contact on a virtual clock;
``memstore`` is the in-memory sync set each node keeps; ``contacts`` reads The ONE's
connectivity traces or generates random-waypoint contacts; ``load`` creates messages
like The ONE's message event generator; ``policies`` holds the routing policies compared;
``report`` defines the outputs as The ONE's MessageStatsReport does; ``command`` is
``pigeon sim``. See ``docs/simulation.md``.
"""

from mesh.sim.engine import SimConfig, Simulation, run_simulation
from mesh.sim.report import JSON_KEYS, SimStats

__all__ = ["JSON_KEYS", "SimConfig", "SimStats", "Simulation", "run_simulation"]
