"""Prefect flows whose GPU step holds the per-worker limit."""
