"""A scheduled deployment of the pipeline flow, served by this process.

    python -m flows.serve                     # nightly at 02:00 (cron "0 2 * * *"), until Ctrl-C
    python -m flows.serve --cron "0 */6 * * *"

It needs a Prefect API to register with: start one with ``prefect server start`` and set
``PREFECT_API_URL=http://127.0.0.1:4200/api`` (the UI is then at http://127.0.0.1:4200). For a work pool on a real
server, ``prefect deploy --all`` uses the same definition from ``prefect.yaml``.
"""

from __future__ import annotations

import argparse

from flows.pipeline import pipeline

DEFAULT_CRON = "0 2 * * *"


def build_deployment(cron: str = DEFAULT_CRON, repo: str = "."):
    """The deployment object: the pipeline flow on a cron schedule (no server needed to build it)."""
    return pipeline.to_deployment(
        name="medpipe-nightly",
        cron=cron,
        parameters={"repo": repo},
        description="Nightly medpipe run: DVC decides which stages rerun.",
        tags=["medpipe"],
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--cron", default=DEFAULT_CRON)
    ap.add_argument("--repo", default=".")
    a = ap.parse_args(argv)
    from prefect import serve

    serve(build_deployment(a.cron, a.repo))


if __name__ == "__main__":
    main()
