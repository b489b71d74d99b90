"""The pipeline's stages, one file each, in lifecycle order.

``prep`` (checks, normalisation, extraction) -> guard-in (governance) -> ``route`` (the
decision) -> ``policy`` (backend chain and limits) -> ``stitch`` (context) -> ``generate``
(backends) -> ``output`` (guard-out helpers) -> record (observability). ``router/plexus.py``
builds them from the configuration and injects them into ``router.pipeline.Pipeline``.
"""
