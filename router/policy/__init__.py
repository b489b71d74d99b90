"""Per-tenant policy: business rules (``rules``), and rate limits and budgets (``limits``)."""
