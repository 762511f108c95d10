"""Deterministic simulation of the slot broker against a model of Prefect (see simulate.py)."""
