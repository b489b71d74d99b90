"""Observing the requests: the per-tenant audit trail (``router.observe.audit``)."""
