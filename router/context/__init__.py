"""Context stitching: collections, ingestion, sources and assembly."""
