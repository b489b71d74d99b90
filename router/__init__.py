"""Plexus: an AI orchestration router."""
