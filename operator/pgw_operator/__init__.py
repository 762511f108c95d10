"""Kopf operator for GpuWorkerPool."""
