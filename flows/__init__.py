"""Prefect flows of the MSA project (thin wrappers; the logic lives in the packages)."""
