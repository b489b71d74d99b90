"""The soak part of ``plexus bench orchestrate``: failures, latency windows and the RSS slope.

The suite runs Orchestrate without pause for ``--soak-seconds`` while the harness samples the
Plexus server's VmRSS every :data:`SAMPLE_S` seconds; this module judges that run: a
least-squares line over the second half of the samples, counted as flat at
≤ :data:`FLAT_SLOPE_MIB_PER_MIN` MiB/min (not judged with fewer than 3 samples there).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.harness import Run
from bench.report import fmt, num, percentiles_ms, table

SAMPLE_S = 5.0
FLAT_SLOPE_MIB_PER_MIN = 1.0  # |slope| of RSS over the soak's second half counted as flat


def _second_half_fit(times: np.ndarray, values: np.ndarray) -> np.ndarray | None:
    half = times >= (times[-1] / 2 if times.size else 0)
    if half.sum() < 3 or np.ptp(times[half]) <= 0:
        return None
    return np.polyfit(times[half] / 60.0, values[half], 1)


def summarise(run: Run) -> dict[str, Any]:
    series = run.extra["rss"]
    times = np.array([t for t, _ in series])
    values = np.array([v for _, v in series])
    fit = _second_half_fit(times, values)
    slope = None if fit is None else float(fit[0])
    lat = percentiles_ms(run.latency)
    windows = []
    if run.ends.size:
        offsets = (run.ends - run.start) / 1e9
        for start in np.arange(0.0, max(run.seconds, SAMPLE_S), SAMPLE_S):
            mask = (offsets >= start) & (offsets < start + SAMPLE_S)
            if mask.any():
                stats = percentiles_ms(run.latency[mask])
                windows.append(
                    {
                        "t_s": float(start),
                        "requests": int(mask.sum()),
                        "p50_ms": stats["p50"],
                        "p99_ms": stats["p99"],
                    }
                )
    return {
        "concurrency": run.concurrency,
        "seconds": run.seconds,
        "requests": run.requests,
        "failures": run.failures,
        "errors": run.errors,
        "error_examples": run.examples,
        "rps": run.rps,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "plexus_cpu_us_per_request": run.cpu_us_per_call("plexus"),
        "rss_series": [{"t_s": round(t, 2), "rss_mib": round(v, 2)} for t, v in series],
        "rss_first_mib": float(values[0]) if values.size else None,
        "rss_max_mib": float(values.max()) if values.size else None,
        "rss_last_mib": float(values[-1]) if values.size else None,
        "rss_slope_second_half_mib_per_min": slope,
        "flat": None if slope is None else bool(abs(slope) <= FLAT_SLOPE_MIB_PER_MIN),
        "windows": windows,
    }


def markdown(result: dict[str, Any] | None) -> str:
    if not result:
        return "Not run (`--soak-seconds 0`)."
    r = result
    rss = " / ".join(fmt(r[k], 1) for k in ("rss_first_mib", "rss_max_mib", "rss_last_mib"))
    summary = table(
        [r],
        [
            ("concurrency", "concurrency"),
            ("seconds", num("seconds", 1)),
            ("requests", "requests"),
            ("failures", "failures"),
            ("req/s", num("rps")),
            ("p50 ms", num("p50_ms", 2)),
            ("p99 ms", num("p99_ms", 2)),
            ("Plexus CPU µs/req", num("plexus_cpu_us_per_request")),
            ("RSS first / max / last MiB", lambda _: rss),
            ("RSS slope, 2nd half (MiB/min)", num("rss_slope_second_half_mib_per_min", 3)),
        ],
    )
    failures = "0 failures: met" if r["failures"] == 0 else f"**{r['failures']} failures**"
    errors = f" Errors: {r['errors']}, e.g. {r['error_examples']}." if r["errors"] else ""
    if r["flat"] is None:
        flat = "not judged (too few RSS samples in the second half: soak at least 20 s)"
    elif r["flat"]:
        flat = f"flat (|slope| ≤ {FLAT_SLOPE_MIB_PER_MIN:g} MiB/min)"
    else:
        flat = f"**not flat** (|slope| > {FLAT_SLOPE_MIB_PER_MIN:g} MiB/min)"
    series = ", ".join(f"{p['t_s']:.0f} s: {p['rss_mib']:.1f}" for p in r["rss_series"])
    return (
        f"Orchestrate at concurrency {r['concurrency']} without pause; the Plexus server's "
        f"VmRSS sampled every {SAMPLE_S:g} s; the slope is a least-squares line over the samples "
        f"of the second half.\n\n{summary}\n\nResult: {failures}; memory {flat}.{errors}\n\n"
        f"RSS (MiB) over time: {series}"
    )


def plot(result: dict[str, Any] | None, ax: Any) -> bool:
    """RSS over the soak and the second-half fit on ``ax``; False if there was no soak."""
    if not result or not result["rss_series"]:
        return False
    times = np.array([p["t_s"] for p in result["rss_series"]])
    values = np.array([p["rss_mib"] for p in result["rss_series"]])
    ax.plot(times, values, marker="o", color="tab:blue", label="Plexus VmRSS")
    fit = _second_half_fit(times, values)
    if fit is not None:
        half = times[times >= times[-1] / 2]
        slope = f"{fit[0]:+.3f} MiB/min"
        ax.plot(half, np.polyval(fit, half / 60.0), "--", color="tab:red", label=slope)
    ax.set_xlabel("seconds into the soak")
    ax.set_title(
        f"Soak at c={result['concurrency']}: {result['requests']} calls, "
        f"{result['failures']} failed"
    )
    ax.legend(fontsize=8)
    return True
