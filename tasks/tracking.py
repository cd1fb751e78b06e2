"""The only module that talks to MLflow: the tracking store, runs, and (below) the model registry.

Default store: ``sqlite:///mlflow/mlflow.db`` with artifacts under ``mlflow/artifacts`` (relative to the working
directory, which is the repository root for every stage). ``MLFLOW_TRACKING_URI`` overrides it (e.g. an MLflow
server on PostgreSQL; a sqlite URI keeps its artifacts in ``artifacts/`` beside the database). One MLflow run per
trained model: the train stage opens it and tags it with the model's content hash (``medpipe.model_sha256``);
evaluate, export and promote find the run by that tag (:func:`run_for_model`), so no run id is written into a
DVC-tracked output.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

MODEL_TAG = "medpipe.model_sha256"


def tracking_uri() -> str:
    """The tracking URI in effect: ``MLFLOW_TRACKING_URI`` or the project's sqlite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    # a stage under `dvc exp run --temp/--queue` runs in a temporary copy: DVC_ROOT names the workspace, whose store
    # outlives the copy
    store = (Path(os.environ.get("DVC_ROOT") or ".") / "mlflow").resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _default_artifact_location(experiment: str) -> str | None:
    """Artifacts of a sqlite store live beside the database (``<db folder>/artifacts/<experiment>``); a server
    decides for itself (None)."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts" / experiment).as_uri()


def client() -> MlflowClient:
    """An MlflowClient on the configured tracking and registry store."""
    import logging

    from mlflow.tracking import MlflowClient

    import mlflow

    # alembic prints its migrations at INFO on a fresh sqlite store: noise for a person reading the stage log
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri()
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or uri
    # mlflow.set_*_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI "for subprocesses"; keep the
    # environment as the user set it, so that the next call (another working directory, a test) resolves afresh
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return MlflowClient(tracking_uri=uri, registry_uri=registry)


def experiment_id(name: str) -> str:
    """Get or create the experiment ``name``; returns its id."""
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=_default_artifact_location(name))


SWEEP_TAG = "medpipe.sweep"


def sweep_parent(experiment: str, sweep: str, create: bool = True) -> str | None:
    """The parent run of sweep ``sweep`` in ``experiment`` (created on first use); returns its id (None: absent).

    Each run of a seed or model grid (``dvc exp run --queue -S base.sweep=NAME ...``, the MedMNIST benchmark) is
    nested under it, so the MLflow UI shows the grid as one expandable row and compares its children.
    """
    c = client()
    exp = experiment_id(experiment)
    found = c.search_runs([exp], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`medpipe.role` = 'sweep'",
                          order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        return found[0].info.run_id
    if not create:
        return None
    return c.create_run(exp, run_name=sweep, tags={SWEEP_TAG: sweep, "medpipe.role": "sweep"}).info.run_id


def end_sweep(experiment: str, sweep: str) -> None:
    """Mark a sweep's parent run FINISHED (children keep their own status)."""
    parent = sweep_parent(experiment, sweep, create=False)
    if parent:
        end_run(parent)


def sweep_children(experiment: str, sweep: str) -> list[Any]:
    """The finished runs nested under sweep ``sweep``, oldest first (``mlflow.entities.Run`` objects)."""
    c = client()
    parent = sweep_parent(experiment, sweep, create=False)
    if parent is None:
        return []
    return c.search_runs(
        [experiment_id(experiment)], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
        order_by=["attributes.start_time ASC"], max_results=5000,
    )


def start_run(
    experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any], sweep: str | None = None
) -> str:
    """Open a new run (and leave it RUNNING for the later stages), nested under ``sweep``'s parent; returns its id."""
    c = client()
    tags = dict(tags)
    if sweep:
        tags.update({"mlflow.parentRunId": sweep_parent(experiment, sweep), SWEEP_TAG: sweep})
    run = c.create_run(experiment_id(experiment), run_name=run_name, tags=tags)
    log_params(run.info.run_id, params)
    return run.info.run_id


def run_name(prefix: str, params_hash: str, experiment: str | None = None) -> str:
    """A run name that differs when the params differ: ``<prefix>-<params hash, 8 hex>``, then `` (<experiment>)``
    under ``dvc exp run``.

    Args:
        prefix: the readable part, e.g. ``synthetic-ct-cnn-resnet18-seed42``.
        params_hash: the hash of every params value the run depends on (``tasks.provenance.params_hash``); two runs
            that differ only in ``train.epochs`` differ here.
        experiment: the DVC experiment's name (``DVC_EXP_NAME``), or None outside ``dvc exp run``.
    """
    name = f"{prefix}-{params_hash[:8]}"
    return f"{name} ({experiment})" if experiment else name


def rename_run(run_id: str, name: str) -> None:
    """Give run ``run_id`` the display name ``name`` (the ``mlflow.runName`` tag)."""
    client().update_run(run_id, name=name)


def source_tags(entry_point: str, commit: str) -> dict[str, str]:
    """The tags the MLflow UI shows in its Source column: the stage's entry point (a path in the repository) as a
    local source, and the git commit of the code (a bare sha; whether tracked code differed from it is train's
    ``git_code_changed`` tag; a legacy ``-dirty`` suffix is stripped)."""
    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL"}
    if commit and commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


def log_dataset(
    run_id: str, name: str, digest: str, source: str, input_shape: tuple[int, ...], counts: dict[str, int],
    context: str = "training",
) -> None:
    """Record the data set a run used (the Dataset column of the MLflow UI), by reference: no values are logged.

    Args:
        run_id: the run.
        name: the data set's name (``base.dataset``).
        digest: its content hash: DVC's md5 of the preprocessed data (``<md5>.dir``) under DVC, else a sha256.
        source: where it came from: the ingest input (a DICOM folder or a MedMNIST ``.npz``), as params name it.
        input_shape: (C, *S) of one sample; the schema says float32 (N, C, *S) images and int64 (N,) labels.
        counts: images per split, e.g. ``{"train": 237, "val": 59, "test": 75}`` (the data set's profile).
        context: what the run did with it (the ``mlflow.data.context`` input tag).
    """
    import json

    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec

    class _Dataset(MetaDataset):  # MetaDataset has no profile; the UI shows one when the entity carries it
        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps({f"n_{k}": v for k, v in counts.items()})}

    schema = Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape), "image"),
                     TensorSpec(np.dtype(np.int64), (-1,), "label")])  # fmt: skip
    dataset = _Dataset(LocalArtifactDatasetSource(source), name=name, digest=digest, schema=schema)
    entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
    client().log_inputs(run_id, datasets=[entity])


def tag_model(run_id: str, model_hash: str) -> None:
    """Mark run ``run_id`` as the one that trained the model whose weights hash to ``model_hash``."""
    client().set_tag(run_id, MODEL_TAG, model_hash)


def run_for_model(model_hash: str, source: Path | str) -> str:
    """The id of the run that trained the model with weights hash ``model_hash`` (the latest, if several did).

    Raises:
        RuntimeError: naming ``source`` when no run in the tracking store carries the hash (the store was moved,
            ``MLFLOW_TRACKING_URI`` changed, or the model was not trained here): rerun train.
    """
    c = client()
    experiments = [e.experiment_id for e in c.search_experiments()]
    found = c.search_runs(experiments, filter_string=f"tags.`{MODEL_TAG}` = '{model_hash}'",
                          order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    if not found:
        raise RuntimeError(
            f"{source}: no MLflow run in {tracking_uri()} trained this model ({MODEL_TAG} {model_hash}); the store "
            "was moved or MLFLOW_TRACKING_URI changed: rerun the train stage (dvc repro -f train)"
        )
    return found[0].info.run_id


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log a flat mapping of params (values stringified; MLflow's 6000-char limit respected)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    c = client()
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics (NaN/None skipped) at ``step``."""
    import math
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step or 0)
        for k, v in sorted(metrics.items())
        if v is not None and not (isinstance(v, float) and math.isnan(v))
    ]
    c = client()
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i : i + 500])


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    """Set (or overwrite) tags on run ``run_id`` (values stringified)."""
    c = client()
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def log_artifacts(run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    """Copy files or folders into the run's artifact store."""
    c = client()
    for p in paths:
        if p.is_dir():
            c.log_artifacts(run_id, str(p), artifact_path=f"{artifact_path}/{p.name}" if artifact_path else p.name)
        elif p.exists():
            c.log_artifact(run_id, str(p), artifact_path=artifact_path)


def download_artifact(run_id: str, artifact_path: str, dest: Path) -> Path:
    """Download one artifact of a run into ``dest`` (created); returns the local path."""
    dest.mkdir(parents=True, exist_ok=True)
    return Path(client().download_artifacts(run_id, artifact_path, str(dest)))


def log_dict(run_id: str, data: dict[str, Any], artifact_file: str) -> None:
    """Write ``data`` as JSON to ``artifact_file`` (a path inside the run's artifacts, e.g. ``promote/v3.json``)."""
    client().log_dict(run_id, data, artifact_file)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark run ``run_id`` terminated with ``status`` (FINISHED, FAILED or KILLED)."""
    client().set_terminated(run_id, status=status)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}} -> {"train.lr": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --- model registry ---------------------------------------------------------------------------------------------
# MLflow 3 registry: versions carry a few tags (the promotion metric, commit, data and params hashes, ...; the full
# record is a JSON artifact of the version's run) and are picked by alias
# (`models:/<name>@champion`); registry stages are deprecated and not used.

CHAMPION = "champion"
CHALLENGER = "challenger"
PYFUNC_NAME = "pyfunc"  # the logged model's name inside the run


MAX_VERSION_TAGS = 8  # a registry list a reviewer can read; the rest goes to the version's JSON artifact


def version_details_path(model_name: str, version: str) -> str:
    """Where in the run's artifacts the full record of a registered version lies."""
    return f"registry/{model_name}-v{version}.json"


def log_and_register_pyfunc(
    run_id: str,
    model_name: str,
    code_path: Path,
    artifacts: dict[str, Path],
    tags: dict[str, str],
    input_shape: tuple[int, ...],
    class_names: list[str],
    pip_requirements: list[str] | None = None,
    details: dict[str, Any] | None = None,
    task_kind: str = "classification",
) -> str:
    """Log a pyfunc "model from code" into run ``run_id`` and register it as a new version of ``model_name``.

    Args:
        run_id: the pipeline's MLflow run (its status is left as it was).
        model_name: registered model name (created on first use).
        code_path: the Python file that defines the model and calls ``mlflow.models.set_model``.
        artifacts: artifact key -> local file or folder, handed to the model as ``context.artifacts``.
        tags: set on the new model version (values stringified); at most :data:`MAX_VERSION_TAGS`, what a reviewer
            reads in the registry list.
        input_shape: (C, *S) of one sample; the signature takes float32 (N, C, *S), and the logged input example
            is one blank sample of that shape (zeros: no patient's pixels in the registry).
        class_names: a classifier's output has one ``prob_<class>`` column per class and a ``label`` column; a
            segmenter's is float32 (N, K, *S) probability maps (param ``output: labels``: uint8 (N, *S) label maps).
        pip_requirements: the model's requirements; explicit, so MLflow does not load the model to infer them.
        details: everything else about the version (metrics, export record, ...), written with ``model_name``,
            ``version`` and the tags to :func:`version_details_path` in the run's artifacts.
        task_kind: ``classification`` or ``segmentation`` (the signature's output).

    Returns:
        The new version number, as a string.

    Raises:
        ValueError: more than :data:`MAX_VERSION_TAGS` tags (put the rest in ``details``).
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    import mlflow

    if len(tags) > MAX_VERSION_TAGS:
        raise ValueError(f"{model_name}: {len(tags)} model-version tags {sorted(tags)}; at most {MAX_VERSION_TAGS} "
                         "(pass the rest as details: they go to the version's JSON artifact)")
    c = client()
    prior_status = c.get_run(run_id).info.status
    if task_kind == "segmentation":  # predict -> float32 (N, K, *S); params output=labels -> uint8 (N, *S)
        outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, len(class_names), *input_shape[1:]))])
        params_schema = ParamSchema([ParamSpec("output", "string", "probabilities")])
    else:
        outputs = Schema([ColSpec("float", f"prob_{n}") for n in class_names] + [ColSpec("string", "label")])
        params_schema = None
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
                               outputs=outputs, params=params_schema)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=PYFUNC_NAME,
            python_model=str(code_path),
            artifacts={k: str(v) for k, v in artifacts.items()},
            signature=signature,
            input_example=np.zeros((1, *input_shape), np.float32),
            pip_requirements=pip_requirements,
        )
        # start_run(run_id=...) marks the run FINISHED (or FAILED) on exit; the pipeline decides when it ends
        c.update_run(run_id, status=prior_status)
    tags = {k: str(v) for k, v in tags.items()}
    version = str(mlflow.register_model(info.model_uri, model_name, tags=tags).version)
    record = {"model_name": model_name, "version": version, "model_uri": f"models:/{model_name}/{version}",
              "run_id": run_id, "tags": tags, **(details or {})}  # fmt: skip
    log_dict(run_id, record, version_details_path(model_name, version))
    return version


def alias_version(model_name: str, alias: str) -> str | None:
    """The version of ``model_name`` that carries ``alias``, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(model_name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def version_tag(model_name: str, version: str, key: str) -> str | None:
    """Tag ``key`` of a model version, or None when the version does not have it."""
    return client().get_model_version(model_name, version).tags.get(key)


def champion_metric(model_name: str, metric: str, alias: str = CHAMPION) -> float | None:
    """The ``metric`` tag of the version aliased ``alias`` as a float; None without such a version or tag."""
    version = alias_version(model_name, alias)
    if version is None:
        return None
    raw = version_tag(model_name, version, metric)
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def set_alias(model_name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version`` (an alias names one version; it moves from wherever it was)."""
    client().set_registered_model_alias(model_name, alias, str(version))
