"""The benchmark harness: server processes, one client pool, one drive loop, one adapter shape.

- :mod:`bench.harness.processes`: server children (spawn, ``PORT N``, CPU time, RSS, stop);
- :mod:`bench.harness.serve`: the Plexus server and the echo servicer as such children;
- :mod:`bench.harness.adapters`: one ``run(index) -> (started, first, final, error, detail)``
  shape for every target (Route, Orchestrate, the backend directly);
- :mod:`bench.harness.clients`: the client processes (spawn, ready, go, collect), the drive
  loop and the ABBA rounds.
"""

from bench.harness.clients import ClientPool, Run, abba, combine
from bench.harness.processes import Child, stop_all

__all__ = ["Child", "ClientPool", "Run", "abba", "combine", "stop_all"]
