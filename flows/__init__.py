"""Prefect flows: orchestration only (which stages, in what order, retries, schedules)."""

import os

# offline first: a temporary Prefect server started by the flow would otherwise try to send telemetry and log an
# ERROR when there is no network (make sets the same; a caller's own setting wins)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
