"""Index trade-offs: recall@10 against single-thread latency on synthetic embeddings.

At each size: 384-d unit vectors shaped like sentence embeddings (:class:`Mixture`, seeded),
fresh points of the same mixture as queries; every index kind built by
``router.context.collections.build_index`` from the ``CollectionConfig`` defaults (plus a
stronger search setting for HNSW and IVF on the same index), timed one query at a time on one
thread, recall@10 against exact search.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from bench import api
from bench.report import num, percentiles_us, say, table

K = 10
TARGET_RECALL = 0.95
TARGET_LATENCY_FRACTION = 0.10
BUILD_THREADS = 2  # FAISS threads while building; searches are timed on one thread
INDEX_WARMUP = 20
STRONG_EF_SEARCH = 192
STRONG_NPROBE = 48
# The synthetic embedding model (see Mixture).
LATENT_DIM = 64
WITHIN_SPREAD = 1.5
SHARED_WEIGHT = 0.5
ISOTROPIC_NOISE = 0.5


class Mixture:
    """Unit vectors shaped like sentence embeddings, seeded.

    Each vector is the unit-normalised sum of (a) a point of a Gaussian mixture that lives in a
    random ``LATENT_DIM``-dimensional subspace (``centers`` components with N(0, I) means and
    spread ``WITHIN_SPREAD``), (b) a direction every vector shares (weight ``SHARED_WEIGHT``,
    as real embeddings share a mean direction) and (c) isotropic noise of norm about
    ``ISOTROPIC_NOISE``. Neighbourhoods are meaningful (nearest-neighbour cosine ~0.5-0.6,
    random pairs ~0.07) and the components overlap, so approximate indexes are not given an
    easy, perfectly clustered problem.
    """

    def __init__(self, rng: np.random.Generator, dim: int, centers: int) -> None:
        self.rng = rng
        self.dim = dim
        latent = min(LATENT_DIM, dim)
        basis, _ = np.linalg.qr(rng.standard_normal((dim, latent)))
        self.basis_t = np.ascontiguousarray(basis.T, dtype=np.float32)  # [latent, dim]
        shared = rng.standard_normal(dim)
        self.shared = (shared / np.linalg.norm(shared)).astype(np.float32)
        self.centers = rng.standard_normal((max(1, centers), latent)).astype(np.float32)

    def draw(self, count: int, block: int = 20_000) -> np.ndarray:
        rng, latent = self.rng, self.basis_t.shape[0]
        out = np.empty((count, self.dim), dtype=np.float32)
        for start in range(0, count, block):
            m = min(block, count - start)
            which = rng.integers(0, len(self.centers), m)
            points = self.centers[which] + WITHIN_SPREAD * rng.standard_normal(
                (m, latent), dtype=np.float32
            )
            x = (points / np.sqrt(latent)) @ self.basis_t
            x += SHARED_WEIGHT * self.shared
            x += (ISOTROPIC_NOISE / np.sqrt(self.dim)) * rng.standard_normal(
                (m, self.dim), dtype=np.float32
            )
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[start : start + m] = x
        return out


def mixture_for(rng: np.random.Generator, dim: int, count: int) -> Mixture:
    return Mixture(rng, dim, centers=max(1, round(math.sqrt(count))))


def _time_searches(index: Any, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One query at a time: (latencies ns, ids [n, K])."""
    for i in range(min(INDEX_WARMUP, len(queries))):
        index.search(queries[i : i + 1], K)
    samples = np.empty(len(queries), dtype=np.int64)
    found = np.empty((len(queries), K), dtype=np.int64)
    for i in range(len(queries)):
        query = queries[i : i + 1]
        started = time.perf_counter_ns()
        _, ids = index.search(query, K)
        samples[i] = time.perf_counter_ns() - started
        found[i] = ids[0]
    return samples, found


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    per_query = [
        len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(per_query))


def _setting(index: Any, kind: str) -> str:
    import faiss

    inner = faiss.downcast_index(index.index)
    if kind == "hnsw":
        return (
            f"M {inner.hnsw.nb_neighbors(1)}, efConstruction {inner.hnsw.efConstruction}, "
            f"efSearch {inner.hnsw.efSearch}"
        )
    if kind == "ivf":
        return f"nlist {inner.nlist}, nprobe {inner.nprobe}"
    return "exact"


def run(sizes: list[int], query_count: int, seed: int) -> dict[str, Any]:
    import faiss

    CollectionConfig = api.CollectionConfig
    dim = 384
    defaults = CollectionConfig()
    strong = {
        "hnsw": CollectionConfig(
            index="hnsw",
            hnsw=defaults.hnsw.model_copy(update={"ef_search": STRONG_EF_SEARCH}),
        ),
        "ivf": CollectionConfig(
            index="ivf", ivf=defaults.ivf.model_copy(update={"nprobe": STRONG_NPROBE})
        ),
    }
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for size in sizes:
        rng = np.random.default_rng([seed, size])
        mixture = mixture_for(rng, dim, size)
        say(f"[index] n={size}: generating {size} + {query_count} vectors ({dim}-d)")
        base = mixture.draw(size)
        queries = mixture.draw(query_count)
        ids = np.arange(size, dtype=np.int64)
        truth: np.ndarray | None = None
        flat_p50 = float("nan")
        for kind in ("flat", "hnsw", "ivf"):
            config = CollectionConfig(index=kind)
            faiss.omp_set_num_threads(BUILD_THREADS)
            t0 = time.perf_counter()
            index, built = api.build_index(base, ids, config)
            build_seconds = time.perf_counter() - t0
            memory = int(faiss.serialize_index(index).nbytes)
            faiss.omp_set_num_threads(1)
            say(
                f"[index] n={size}: built {built} in {build_seconds:.1f} s "
                f"({memory / 2**20:.0f} MiB)"
            )
            variants = [("default", config)]
            if kind in strong:
                variants.append(("stronger", strong[kind]))
            for variant, search_config in variants:
                api.set_search_params(index, built, search_config)
                samples, found = _time_searches(index, queries)
                stats = percentiles_us(samples)
                if kind == "flat":
                    truth, flat_p50 = found, stats["p50"]
                assert truth is not None
                recall = _recall(found, truth)
                fraction = stats["p50"] / flat_p50 if flat_p50 else float("nan")
                rows.append(
                    {
                        "size": size,
                        "kind": built,
                        "variant": variant,
                        "setting": _setting(index, built),
                        "build_seconds": round(build_seconds, 2),
                        "memory_bytes": memory,
                        "p50_us": stats["p50"],
                        "p99_us": stats["p99"],
                        "mean_us": stats["mean"],
                        "recall_at_10": recall,
                        "latency_fraction": fraction,
                        "meets_target": bool(
                            recall >= TARGET_RECALL and fraction <= TARGET_LATENCY_FRACTION
                        ),
                    }
                )
                say(
                    f"[index] n={size} {built} {variant}: p50 {stats['p50']:.0f} us, "
                    f"recall@10 {recall:.3f}"
                )
            del index
        del base, queries
    return {
        "run": True,
        "dim": dim,
        "queries": query_count,
        "seed": seed,
        "build_threads": BUILD_THREADS,
        "mixture": {
            "centers": "round(sqrt(n))",
            "latent_dim": LATENT_DIM,
            "within_spread": WITHIN_SPREAD,
            "shared_weight": SHARED_WEIGHT,
            "isotropic_noise": ISOTROPIC_NOISE,
        },
        "target": {"recall_at_10": TARGET_RECALL, "latency_fraction": TARGET_LATENCY_FRACTION},
        "rows": rows,
        "seconds": round(time.monotonic() - started, 1),
    }


def markdown(part: dict[str, Any]) -> str:
    if not part.get("run"):
        return f"Not run: {part['reason']}."
    results = table(
        part["rows"],
        [
            ("vectors", lambda r: f"{r['size']:,}"),
            ("index", "kind"),
            ("setting", lambda r: r["setting"] + (" (default)" * (r["variant"] == "default"))),
            (
                "build s",
                lambda r: f"{r['build_seconds']:.1f}" + " (same)" * (r["variant"] == "stronger"),
            ),
            ("memory MiB", lambda r: f"{r['memory_bytes'] / 2**20:.1f}"),
            ("p50 µs", num("p50_us")),
            ("p99 µs", num("p99_us")),
            ("recall@10", num("recall_at_10", 3)),
            ("p50 / exact p50", lambda r: f"{100 * r['latency_fraction']:.1f}%"),
            ("meets target", lambda r: "**yes**" if r["meets_target"] else "no"),
        ],
    )
    mix = part["mixture"]
    return "\n".join(
        [
            f"- Data: synthetic {part['dim']}-d unit vectors (the encoder's dimension), seed "
            f"{part['seed']}: a Gaussian mixture of round(sqrt(n)) components in a random "
            f"{mix['latent_dim']}-d subspace (spread {mix['within_spread']}), plus a direction "
            f"every vector shares (weight {mix['shared_weight']}) and isotropic noise (norm "
            f"~{mix['isotropic_noise']}), normalised; {part['queries']} queries are fresh points "
            "of the same mixture.",
            "- Each index is built by `router.context.collections.build_index` from a "
            "`CollectionConfig` (FAISS on "
            f"{part['build_threads']} threads); the stronger rows apply only a search-time "
            "setting to the same index (as `Collection.load` does), so build time and memory "
            "are the default's. Memory is the size of `faiss.serialize_index`.",
            "- Latency: one query at a time, k = 10, FAISS on one thread (as the server runs "
            f"it), after {INDEX_WARMUP} warm-up queries. recall@10 is against the exact (flat) "
            "results.",
            f"- Target: recall@10 ≥ {TARGET_RECALL} at ≤ {100 * TARGET_LATENCY_FRACTION:.0f}% "
            "of exact search's p50 latency.",
            "",
            results,
        ]
    )


def plot(index: dict[str, Any], left: Any) -> None:
    """recall@10 against p50 per index kind and size on ``left``."""
    if index.get("run"):
        colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
        markers = {"flat": "s", "hnsw": "o", "ivf": "^"}
        sizes = sorted({r["size"] for r in index["rows"]})
        for n, size in enumerate(sizes):
            color = colors[n % len(colors)]
            for kind, marker in markers.items():
                rows = [r for r in index["rows"] if r["size"] == size and r["kind"] == kind]
                if not rows:
                    continue
                left.plot(
                    [r["p50_us"] for r in rows],
                    [r["recall_at_10"] for r in rows],
                    "-" + marker,
                    color=color,
                    label=f"{kind}, n={size:,}",
                )
        left.axhline(TARGET_RECALL, color="grey", linestyle=":", linewidth=1)
        left.set_xscale("log")
        left.set_xlabel("p50 latency per query, one thread (µs, log)")
        left.set_ylabel("recall@10 vs exact")
        left.set_title("Index trade-off (lines: default → stronger search setting)")
        left.grid(alpha=0.3, which="both")
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "index part not run", ha="center", va="center")
        left.set_axis_off()
