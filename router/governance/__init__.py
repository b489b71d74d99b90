"""Governance: what may go into a model and what may come out of it.

Detectors (``pii_scan`` for structured identifiers, ``ner`` for names, places, organisations
and addresses, ``injection`` for prompt injections) find spans; the guard stages decide what
to do with them per tenant (redact reversibly, mask, allow, block) and record findings.
"""
