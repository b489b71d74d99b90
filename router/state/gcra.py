"""GCRA, the generic cell rate algorithm, once in Python and once in Lua (for Redis).

A limiter admits ``rate`` units per ``period`` with bursts of up to ``burst`` units. Its whole
state is one number, the theoretical arrival time TAT: when the schedule of everything admitted
so far, paced at the steady rate, would be done. With the emission interval ``T = period / rate``
and the tolerance ``tau = T * (burst - 1)``, a cost of ``n`` units arriving at ``now`` is due to
finish at ``max(TAT, now) + n * T``; it is admitted when that is at most ``tau + T`` ahead of
now (TAT then moves there), and refused otherwise (TAT stays), with the wait until it would fit.
A fresh limiter (TAT in the past) admits ``burst`` units at once, then one per T. A cost above
``burst`` can never fit: its wait is infinite.

Arrivals up to ``EPSILON_SECONDS`` early are admitted: float rounding at the boundary must not
refuse a request that is exactly on time (Redis's clock has microsecond resolution anyway).
The Lua twin below computes the same with the same names; tests hold both against a reference.
"""

from __future__ import annotations

import math

EPSILON_SECONDS = 1e-6


def gcra(
    tat: float, now: float, emission: float, tolerance: float, cost: int, burst: int
) -> tuple[bool, float, float]:
    """One arrival of ``cost`` units at ``now`` on a limiter whose TAT is ``tat``.

    Returns (allowed, the TAT after it, the wait in seconds until it would be admitted: 0 when
    allowed, ``math.inf`` when ``cost`` exceeds ``burst``). A cost of 0 is always allowed and
    leaves TAT as it was."""
    if cost == 0:
        return True, tat, 0.0
    new_tat = max(tat, now) + cost * emission
    wait = new_tat - emission - tolerance - now
    if wait > EPSILON_SECONDS:
        return False, tat, math.inf if cost > burst else wait
    return True, new_tat, 0.0


# The Lua twin: a local function for scripts that include it. ``math.huge`` is Lua's infinity.
GCRA_LUA = """
local EPSILON_SECONDS = 1e-6
local function gcra(tat, now, emission, tolerance, cost, burst)
  if cost == 0 then return true, tat, 0 end
  local base = tat
  if now > base then base = now end
  local new_tat = base + cost * emission
  local wait = new_tat - emission - tolerance - now
  if wait > EPSILON_SECONDS then
    if cost > burst then return false, tat, math.huge end
    return false, tat, wait
  end
  return true, new_tat, 0
end
"""
