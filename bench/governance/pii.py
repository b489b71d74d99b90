"""Part 1: PII spans on the presidio-research synthetic set, and the cost of detect + redact.

The data set's entity types are mapped onto Plexus's kinds (:data:`TYPE_MAP`; a ``DATE_TIME``
span is a ``DATE_OF_BIRTH`` when a birth cue stands in the 40 characters before it), the other
types are listed as not covered and left out of every figure. Plexus's spans are what the
request path finds: ``PiiRules.detect`` of a tenant with the PII defaults (the structured
scanner, the learned tagger's spans at ``min_score`` or above, made non-overlapping by
``merge_spans``). They are scored by ``router.governance.ner_training.evaluate_spans``
(exact and overlap match, per kind and micro-averaged over the covered kinds). When
presidio-analyzer is installed, its pattern recognizers run on the same sentences (a blank
spaCy pipeline, so no NER model is needed) and are scored on the structured kinds both cover.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench import api
from bench.governance import presidio
from bench.report import fmt, markdown_table, percentiles_us, say

STRUCTURED = (
    "CARD",
    "IBAN",
    "EMAIL",
    "PHONE",
    "SSN",
    "IP_ADDRESS",
    "URL",
    "DATE_OF_BIRTH",
    "POSTCODE",
)
"""The structured scanner's kinds; CARD and IBAN are checksummed."""
LEARNED = ("PERSON", "LOCATION", "ORGANIZATION", "ADDRESS")
KINDS = (*STRUCTURED, *LEARNED)

TYPE_MAP = {
    "CREDIT_CARD": "CARD",
    "IBAN_CODE": "IBAN",
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "US_SSN": "SSN",
    "IP_ADDRESS": "IP_ADDRESS",
    "DOMAIN_NAME": "URL",
    "URL": "URL",
    "ZIP_CODE": "POSTCODE",
    "PERSON": "PERSON",
    "GPE": "LOCATION",
    "LOCATION": "LOCATION",
    "LOC": "LOCATION",
    "ORGANIZATION": "ORGANIZATION",
    "ORG": "ORGANIZATION",
    "STREET_ADDRESS": "ADDRESS",
}
"""The data set's types (and their Presidio synonyms) as Plexus kinds."""
BIRTH_CUE = re.compile(r"(?i)\b(born|birth|d\.?o\.?b)")
BIRTH_WINDOW = 40

REFERENCE = [
    {
        "system": "Presidio analyzer, default configuration (published)",
        "precision": 0.685,
        "recall": 0.603,
        "f2": 0.618,
    },
    {
        "system": "Presidio analyzer with a transformer NER model (published)",
        "precision": 0.870,
        "recall": 0.839,
        "f2": 0.845,
    },
]
SKIPPED_PRESIDIO = {"run": False, "reason": "skipped (--skip-presidio)"}
GOAL_F2 = 0.85
GOAL_RECALL, GOAL_PRECISION = 0.98, 0.95
GOAL_MS_PER_100 = 1.0
WARMUP = 200


# ----------------------------------------------------------------------------- data


def load(path: Path) -> dict[str, Any]:
    """Texts, gold spans as Plexus kinds, and the counts of mapped and not-covered types."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    texts: list[str] = []
    gold: list[list[Any]] = []
    mapped: Counter[str] = Counter()
    not_covered: Counter[str] = Counter()
    for record in records:
        text = record["full_text"]
        spans = []
        for s in record["spans"]:
            source, start, end = s["entity_type"], s["start_position"], s["end_position"]
            kind = TYPE_MAP.get(source)
            if source == "DATE_TIME":
                before = text[max(0, start - BIRTH_WINDOW) : start]
                if BIRTH_CUE.search(before):
                    kind, source = "DATE_OF_BIRTH", "DATE_TIME (after a birth cue)"
                else:
                    source = "DATE_TIME (other)"
            if kind is None:
                not_covered[source] += 1
                continue
            mapped[f"{source} -> {kind}"] += 1
            spans.append(api.Span(kind, start, end))
        texts.append(text)
        gold.append(spans)
    return {"texts": texts, "gold": gold, "mapped": mapped, "not_covered": not_covered}


def pii_rules(learned: bool) -> Any:
    """A tenant's PII rules with the defaults (everything redacted), compiled as serving does."""
    config = api.GovernanceConfig(pii=api.PiiConfig(learned=learned))
    return api.compile_rules(config, None).pii  # no injection model to resolve


def tagger_status() -> tuple[bool, str]:
    """Whether the learned tagger loads, and why not."""
    try:
        tagger = api.EntityTagger.default()
    except Exception as exc:  # noqa: BLE001 - a missing or refused model file is reported
        return False, f"{type(exc).__name__}: {exc}"
    created = getattr(tagger.card, "created_at", "")
    return True, f"{tagger.source} (created {created}, span threshold {tagger.threshold})"


# ----------------------------------------------------------------------------- scoring


def _rounded(report: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    return {
        match: {
            kind: {k: (int(v) if k in ("tp", "fp", "fn") else round(v, 4)) for k, v in s.items()}
            for kind, s in kinds.items()
        }
        for match, kinds in report.items()
    }


def score(predicted: list[list[Any]], gold: list[list[Any]], texts: list[str], kinds: Any) -> Any:
    return _rounded(api.evaluate_spans(predicted, gold, kinds=tuple(kinds), texts=texts))


def _per_100(samples_ns: list[int], tokens: list[int]) -> np.ndarray:
    return np.array([ns * 100 / t for ns, t in zip(samples_ns, tokens, strict=True)]) / 1e6


def _ms(values: np.ndarray) -> dict[str, float]:
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(float(p50), 4), "p99": round(float(p99), 4)}


def time_detect(rules: Any, texts: list[str], repeats: int) -> dict[str, Any]:
    """detect + redact per sentence, one at a time on this thread, and each detector alone."""
    items = [(t, len(t.split())) for t in texts if t.split()]
    for text, _ in items[:WARMUP]:
        api.redact(text, rules.detect(text), rules)
    detect_redact: list[int] = []
    tokens: list[int] = []
    for _ in range(repeats):
        for text, count in items:
            started = time.perf_counter_ns()
            spans = rules.detect(text)
            api.redact(text, spans, rules)
            detect_redact.append(time.perf_counter_ns() - started)
            tokens.append(count)
    scanner = api.PiiScanner()
    parts: dict[str, Any] = {"structured scanner": scanner.scan}
    if rules.learned:
        parts["learned tagger"] = api.EntityTagger.default().tag
    alone = {}
    for name, detect in parts.items():
        samples = []
        for text, _ in items:
            started = time.perf_counter_ns()
            detect(text)
            samples.append(time.perf_counter_ns() - started)
        alone[name] = {
            "per_100_tokens_ms": _ms(_per_100(samples, [c for _, c in items])),
            "per_sentence_us": {k: round(v, 1) for k, v in percentiles_us(samples).items()},
        }
    per_100 = _per_100(detect_redact, tokens)
    return {
        "samples": len(detect_redact),
        "repeats": repeats,
        "tokens_mean": round(float(np.mean([c for _, c in items])), 1),
        "native_scanner": bool(scanner.native),
        "per_100_tokens_ms": _ms(per_100),
        "per_sentence_us": {k: round(v, 1) for k, v in percentiles_us(detect_redact).items()},
        "aggregate_ms_per_100_tokens": round(
            float(np.sum(detect_redact) / 1e6 * 100 / np.sum(tokens)), 4
        ),
        "alone": alone,
        "histogram_ms": np.percentile(per_100, np.linspace(0, 100, 101)).round(5).tolist(),
    }


# ----------------------------------------------------------------------------- Presidio


# ----------------------------------------------------------------------------- the part


def _goals(scores: Any, timing: dict[str, Any] | None) -> list[dict[str, Any]]:
    goals = []
    for match in ("exact", "overlap"):
        f2 = scores[match]["all"]["f2"]
        goals.append(
            {
                "goal": f"PII overall F2 ≥ {GOAL_F2} ({match} match, covered kinds)",
                "measured": f"{f2:.3f}",
                "met": f2 >= GOAL_F2,
            }
        )
    for kind in STRUCTURED:
        e, o = scores["exact"][kind], scores["overlap"][kind]
        if not e["tp"] + e["fn"]:
            continue
        met = {
            m: s["recall"] >= GOAL_RECALL and s["precision"] >= GOAL_PRECISION
            for m, s in (("exact", e), ("overlap", o))
        }
        measured = f"R {e['recall']:.3f}, P {e['precision']:.3f}"
        if (o["recall"], o["precision"]) != (e["recall"], e["precision"]):
            measured += f" (overlap: R {o['recall']:.3f}, P {o['precision']:.3f})"
        if met["overlap"] != met["exact"]:
            measured += f"; {'met' if met['overlap'] else 'missed'} on overlap"
        goals.append(
            {
                "goal": f"{kind}: recall ≥ {GOAL_RECALL} with precision ≥ {GOAL_PRECISION} "
                "(exact match)",
                "measured": measured,
                "met": met["exact"],
            }
        )
    if timing is not None:
        p99 = timing["per_100_tokens_ms"]["p99"]
        goals.append(
            {
                "goal": f"PII detect + redact p99 ≤ {GOAL_MS_PER_100} ms per 100 tokens",
                "measured": f"{p99:.3f} ms",
                "met": p99 <= GOAL_MS_PER_100,
            }
        )
    return goals


def _taken(scanned: list[list[Any]], merged: list[list[Any]]) -> dict[str, int]:
    """Structured spans that ``merge_spans`` dropped for an overlapping (longer) span, counted
    as ``"KIND -> WINNER"``."""
    taken: Counter[str] = Counter()
    for ours, final in zip(scanned, merged, strict=True):
        kept = {(s.kind, s.start, s.end) for s in final}
        for span in ours:
            if (span.kind, span.start, span.end) in kept:
                continue
            winners = [f.kind for f in final if f.start < span.end and f.end > span.start]
            taken[f"{span.kind} -> {'/'.join(winners) or 'none'}"] += 1
    return dict(taken.most_common())


def _presidio(texts: list[str], gold: list[list[Any]]) -> dict[str, Any]:
    result = presidio.analyze(texts)
    if result["run"]:
        predicted, samples = result.pop("predicted"), result.pop("samples_ns")
        result["scores"] = score(predicted, gold, texts, presidio.KINDS)
        result["per_100_tokens_ms"] = _ms(
            _per_100(samples, [max(len(t.split()), 1) for t in texts])
        )
    return result


def run(path: Path, *, repeats: int, with_presidio: bool) -> dict[str, Any]:
    if not path.is_file():
        say(f"[pii] {path} does not exist; the PII part is not run")
        return {"run": False, "reason": f"the data file `{path}` does not exist"}
    data = load(path)
    texts, gold = data["texts"], data["gold"]
    learned, tagger = tagger_status()
    if not learned:
        say(f"[pii] warning: the learned tagger does not load ({tagger}); structured kinds only")
    rules = pii_rules(learned)
    say(f"[pii] detecting in {len(texts)} sentences (learned tagger {'on' if learned else 'off'})")
    started = time.monotonic()
    predicted = [rules.detect(text) for text in texts]
    detect_s = time.monotonic() - started
    scanner = api.PiiScanner()
    scanner_only = [scanner.scan(text) for text in texts]
    gold_counts = Counter(s.kind for spans in gold for s in spans)
    say(f"[pii] timing detect + redact, {repeats} passes, one sentence at a time")
    timings = time_detect(rules, texts, repeats)
    result = {
        "run": True,
        "data": str(path),
        "sentences": len(texts),
        "learned": learned,
        "tagger": tagger,
        "min_score": rules.min_score,
        "mapping": dict(sorted(data["mapped"].items())),
        "not_covered": dict(data["not_covered"].most_common()),
        "gold_spans": {k: gold_counts.get(k, 0) for k in KINDS},
        "scores": score(predicted, gold, texts, KINDS),
        "scanner_alone": score(scanner_only, gold, texts, STRUCTURED),
        "taken_by_merge": _taken(scanner_only, predicted),
        "plexus_on_presidio_kinds": score(predicted, gold, texts, presidio.KINDS),
        "detect_seconds": round(detect_s, 2),
        "timing": timings,
        "presidio": _presidio(texts, gold) if with_presidio else SKIPPED_PRESIDIO,
        "reference": REFERENCE,
    }
    result["goals"] = _goals(result["scores"], timings)
    return result


# ----------------------------------------------------------------------------- report


def _f(value: float) -> str:
    return f"{value:.3f}"


def _kind_rows(part: dict[str, Any], scores: Any, kinds: Any) -> list[list[str]]:
    rows = []
    for kind in (*kinds, "all"):
        e, o = scores["exact"][kind], scores["overlap"][kind]
        gold = int(e["tp"] + e["fn"])
        name = "**overall**" if kind == "all" else kind
        rows.append(
            [
                name,
                str(gold),
                _f(e["precision"]),
                _f(e["recall"]),
                _f(e["f1"]),
                _f(e["f2"]),
                _f(o["precision"]),
                _f(o["recall"]),
                _f(o["f1"]),
                _f(o["f2"]),
                f"{int(e['tp'])}/{int(e['fp'])}/{int(e['fn'])}",
            ]
        )
    return rows


HEADER = [
    "kind",
    "gold",
    "P exact",
    "R exact",
    "F1 exact",
    "F2 exact",
    "P overlap",
    "R overlap",
    "F1 overlap",
    "F2 overlap",
    "tp/fp/fn exact",
]


def markdown(part: dict[str, Any]) -> str:
    if not part.get("run"):
        return f"Not run: {part['reason']}."
    s = part["scores"]
    mapping = ", ".join(f"`{m}`" for m in part["mapping"])
    missing = ", ".join(f"{k} ({v})" for k, v in part["not_covered"].items())
    lines = [
        f"Data: `{part['data']}`, {part['sentences']:,} sentences. Plexus's spans are "
        "`PiiRules.detect` with the PII defaults: the structured scanner, the learned tagger's "
        f"spans with score ≥ {part['min_score']} and `merge_spans` (non-overlapping: the longer "
        "wins, then the surer). Scored by `router.governance.ner_training.evaluate_spans`: "
        "exact = same kind and offsets; overlap = same kind and at least one shared character, "
        "each span matched once; spans trimmed of surrounding whitespace; overall = "
        "micro-average over the covered kinds.",
        f"Learned tagger: {part['tagger']}."
        if part["learned"]
        else f"**The learned tagger did not load** ({part['tagger']}): PERSON, LOCATION, "
        "ORGANIZATION and ADDRESS have no predictions, so their recall is 0.",
        f"Type mapping (data set -> Plexus, spans): {mapping}.",
        f"Not covered by Plexus, left out of every figure including overall: {missing}.",
        "",
        markdown_table(HEADER, _kind_rows(part, s, KINDS)),
        "",
        "The structured scanner alone (before merging with the tagger's spans). Structured "
        "spans the merge gave to an overlapping longer span: "
        + (", ".join(f"{k} ×{v}" for k, v in part["taken_by_merge"].items()) or "none")
        + ":",
        "",
        markdown_table(HEADER, _kind_rows(part, part["scanner_alone"], STRUCTURED)),
        "",
        "Overall beside Presidio's published figures (presidio-research's evaluation of this "
        "data set under its own type mapping; a reference, not the same scorer):",
        "",
    ]
    overall = [
        [
            "Plexus, exact match (this run)",
            _f(s["exact"]["all"]["precision"]),
            _f(s["exact"]["all"]["recall"]),
            _f(s["exact"]["all"]["f2"]),
        ],
        [
            "Plexus, overlap match (this run)",
            _f(s["overlap"]["all"]["precision"]),
            _f(s["overlap"]["all"]["recall"]),
            _f(s["overlap"]["all"]["f2"]),
        ],
        *[
            [r["system"], _f(r["precision"]), _f(r["recall"]), _f(r["f2"])]
            for r in part["reference"]
        ],
    ]
    lines += [markdown_table(["system", "precision", "recall", "F2"], overall), ""]
    lines += presidio.markdown(part["presidio"], part["plexus_on_presidio_kinds"])
    timing = part["timing"]
    if timing:
        alone = "; ".join(
            f"{name} p50 {a['per_100_tokens_ms']['p50']:.3f} / p99 "
            f"{a['per_100_tokens_ms']['p99']:.3f} ms"
            for name, a in timing["alone"].items()
        )
        lines += [
            f"Cost of `PiiRules.detect` + `redact` per sentence, one at a time on one thread "
            f"({timing['repeats']} passes, {timing['samples']:,} samples, "
            f"{timing['tokens_mean']} whitespace tokens per sentence on average, native scanner "
            f"{'yes' if timing['native_scanner'] else 'no'}), normalised per 100 whitespace "
            f"tokens: **p50 {timing['per_100_tokens_ms']['p50']:.3f} ms, p99 "
            f"{timing['per_100_tokens_ms']['p99']:.3f} ms** (all sentences together: "
            f"{timing['aggregate_ms_per_100_tokens']:.3f} ms per 100 tokens); per sentence p50 "
            f"{fmt(timing['per_sentence_us']['p50'], 1)} µs, p99 "
            f"{fmt(timing['per_sentence_us']['p99'], 1)} µs. Each detector alone, per 100 "
            f"tokens: {alone}.",
        ]
    return "\n".join(lines)


def plot(part: dict[str, Any], ax: Any) -> None:
    if not part.get("run"):
        ax.text(0.5, 0.5, "PII: not run", ha="center", va="center")
        ax.set_axis_off()
        return
    kinds = [k for k in KINDS if part["gold_spans"].get(k)] + ["all"]
    xs = np.arange(len(kinds))
    for offset, match, color in ((-0.2, "exact", "tab:blue"), (0.2, "overlap", "tab:cyan")):
        values = [part["scores"][match][k]["f2"] for k in kinds]
        ax.bar(xs + offset, values, 0.4, color=color, label=f"Plexus F2 ({match})")
    theirs = part["presidio"]
    if theirs.get("run"):
        picks = [(i, k) for i, k in enumerate(kinds) if k in presidio.KINDS]
        values = [theirs["scores"]["exact"][k]["f2"] for _, k in picks]
        ax.scatter(
            [i for i, _ in picks],
            values,
            color="tab:red",
            marker="_",
            s=200,
            zorder=3,
            label="Presidio patterns F2 (exact)",
        )
    ax.axhline(GOAL_F2, color="gray", linestyle=":", linewidth=1)
    ax.set_xticks(xs, kinds, rotation=60, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="F2", title="PII spans per kind")
    ax.legend(fontsize=7, loc="upper right")
