"""A scheduled deployment of the pipeline flow, served by this process.

    python -m flows.serve                     # nightly at 02:00 UTC (cron "0 2 * * *"), until Ctrl-C
    python -m flows.serve --cron "0 */6 * * *"

A scheduled run passes no overrides, so it runs what is in the repository's params.yaml (the committed settings; the
flow itself never writes that file). It needs a Prefect API to register with: start one with
``prefect server start`` and set ``PREFECT_API_URL=http://127.0.0.1:4200/api`` (the UI is then at
http://127.0.0.1:4200). For a work pool on a real server, ``make deploy`` (``prefect deploy --all``) registers the same
flow, schedule and parameters from ``prefect.yaml`` under its own name, ``medpipe-nightly``, so the two never replace
each other (tests/test_prefect_cli.py checks that they agree).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from flows.pipeline import pipeline
from tasks.config import HelpFormatter

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

NAME = "medpipe-nightly-served"  # prefect.yaml's work-pool deployment is "medpipe-nightly"
DEFAULT_CRON = "0 2 * * *"
TIMEZONE = "UTC"


def build_deployment(cron: str = DEFAULT_CRON, repo: str = ".") -> RunnerDeployment:
    """The deployment object: the pipeline flow on a cron schedule (in UTC), no overrides (no server needed).

    Args:
        cron: a five-field cron expression.
        repo: the medpipe repository the scheduled runs work in.
    """
    from prefect.schedules import Cron

    return pipeline.to_deployment(
        name=NAME,
        schedule=Cron(cron, timezone=TIMEZONE),
        parameters={"repo": repo},
        description="Nightly medpipe run of the committed params.yaml; DVC decides which stages rerun.",
        tags=["medpipe"],
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--cron", default=DEFAULT_CRON,
                    help=f"five-field cron expression, in {TIMEZONE}, for the scheduled runs")
    ap.add_argument("--repo", default=".", help="the medpipe repository (git + DVC) the scheduled runs work in")
    a = ap.parse_args(argv)
    from prefect import serve

    serve(build_deployment(a.cron, a.repo))


if __name__ == "__main__":
    main()
