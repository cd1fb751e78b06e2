"""Prefect flows: orchestration only (which stages, in what order, retries, schedules)."""
