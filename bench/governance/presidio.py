"""Presidio's analyzer on the same sentences, when presidio-analyzer is installed (optional).

Its default English recognizers run over a blank spaCy pipeline (a tokenizer only: no model
to download), so its spaCy NER recognizer finds nothing and what is compared is its pattern
recognizers, on the structured kinds both detect (:data:`KINDS`). Its output types are mapped
by :data:`TYPE_MAP`, the rest dropped, and the spans made non-overlapping by Plexus's own
``merge_spans``, as Plexus's are. A missing package or any failure here is reported, never
raised.
"""

from __future__ import annotations

import importlib.metadata
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import api
from bench.report import markdown_table, say

TYPE_MAP = {
    "CREDIT_CARD": "CARD",
    "IBAN_CODE": "IBAN",
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "US_SSN": "SSN",
    "IP_ADDRESS": "IP_ADDRESS",
    "URL": "URL",
}
"""Presidio's output types as Plexus kinds."""
KINDS = ("CARD", "IBAN", "EMAIL", "PHONE", "SSN", "IP_ADDRESS", "URL")


def _engine(workdir: Path) -> Any:
    import spacy
    import tldextract
    import tldextract.tldextract
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    # The e-mail recognizer asks tldextract, which would fetch the public suffix list: use
    # the snapshot shipped inside that package instead.
    tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    spacy.blank("en").to_disk(workdir)
    nlp = {"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": str(workdir)}]}
    engine = NlpEngineProvider(nlp_configuration=nlp).create_engine()
    return AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])


def analyze(texts: list[str]) -> dict[str, Any]:
    """Presidio's spans per text (as Plexus kinds) and its time per text, or why not."""
    try:
        version = importlib.metadata.version("presidio-analyzer")
    except importlib.metadata.PackageNotFoundError:
        return {"run": False, "reason": "presidio-analyzer is not installed"}
    try:
        with tempfile.TemporaryDirectory(prefix="plexus-bench-spacy-") as tmp:
            engine = _engine(Path(tmp))
            engine.analyze("warm up 4111 1111 1111 1111", language="en")
            recognizers = sorted(r.name for r in engine.registry.recognizers)
            say(f"[pii] presidio-analyzer {version}: {len(texts)} sentences")
            predicted, samples = [], []
            for text in texts:
                started = time.perf_counter_ns()
                results = engine.analyze(text, language="en")
                samples.append(time.perf_counter_ns() - started)
                spans = [
                    api.Span(TYPE_MAP[r.entity_type], r.start, r.end, r.score)
                    for r in results
                    if r.entity_type in TYPE_MAP
                ]
                predicted.append(api.merge_spans(spans))
    except Exception as exc:  # noqa: BLE001 - the comparison never fails the suite
        return {"run": False, "reason": f"presidio-analyzer failed: {type(exc).__name__}: {exc}"}
    return {
        "run": True,
        "version": version,
        "recognizers": recognizers,
        "predicted": predicted,
        "samples_ns": samples,
    }


def _prf2(s: dict[str, float]) -> str:
    return f"{s['precision']:.3f} / {s['recall']:.3f} / {s['f2']:.3f}"


def markdown(presidio: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Lines comparing ``presidio["scores"]`` with Plexus's scores on the same kinds."""
    if not presidio.get("run"):
        return [f"Presidio side by side: not run ({presidio['reason']}).", ""]
    theirs = presidio["scores"]
    rows = []
    for kind in (*KINDS, "all"):
        row = ["**overall**" if kind == "all" else kind]
        for match in ("exact", "overlap"):
            row += [_prf2(ours[match][kind]), _prf2(theirs[match][kind])]
        rows.append(row)
    header = [
        "kind",
        "Plexus P/R/F2 exact",
        "Presidio P/R/F2 exact",
        "Plexus P/R/F2 overlap",
        "Presidio P/R/F2 overlap",
    ]
    t = presidio["per_100_tokens_ms"]
    mapping = ", ".join(k if k == v else f"{k}->{v}" for k, v in TYPE_MAP.items())
    return [
        f"Presidio side by side on the structured kinds both detect (presidio-analyzer "
        f"{presidio['version']}, run here): its default recognizers "
        f"({', '.join(presidio['recognizers'])}) over a blank English spaCy pipeline, so its "
        "spaCy NER finds nothing and only the pattern recognizers count; score threshold 0 (its "
        f"default); its types mapped as {mapping}, the rest dropped, then made non-overlapping "
        "by the same `merge_spans`. Presidio's analyze took p50 "
        f"{t['p50']:.2f} / p99 {t['p99']:.2f} ms per 100 tokens here.",
        "",
        markdown_table(header, rows),
        "",
    ]
