"""How the flow fails and what it prints: one message naming the stage and its error, retries for transient errors
only, the tracebacks in a log file; and the stages' output relayed live, one line per epoch in a log.

The failing runs use the real pieces: a throw-away git + DVC copy of the repo (tests._repo), the Prefect engine
against prefect_test_harness's server (the CLI subprocess is pointed at the same server, so its task runs can be
read back), DVC's own lock, and real exceptions (a refused connection, a missing file).
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests._repo import REPO, copy_repo

CONSOLE_MAX_LINES = 25


# --- helpers ------------------------------------------------------------------------------------------------------


def _closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused_connection() -> ConnectionRefusedError:
    try:
        socket.create_connection(("127.0.0.1", _closed_port()), timeout=5).close()
    except ConnectionRefusedError as exc:
        return exc
    raise AssertionError("a closed port accepted a connection")


def _missing_file() -> FileNotFoundError:
    try:
        open("/nonexistent-medpipe-dir/params.yaml")  # noqa: SIM115
    except FileNotFoundError as exc:
        return exc
    raise AssertionError("the file exists")


def _chained(cause: BaseException, outer: type[Exception] = RuntimeError) -> Exception:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise outer("could not reach the tracking server") from exc
    except outer as exc:
        return exc


def _task_runs(flow_run_id) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:  # the sync client sends sort/limit as given: give both
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=50)  # fmt: skip


def _state_names(task_run_id) -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [s.name for s in client.read_task_run_states(task_run_id)]


def _flow_run_for(repo: Path) -> Any:
    """The (one) flow run whose ``repo`` parameter is ``repo``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=100)
    (run,) = [r for r in runs if r.parameters.get("repo") == str(repo)]
    return run


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def api_url(harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _cli(repo: Path, api_url: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m flows.pipeline --repo <repo>``, as a user runs it (non-interactive: output to pipes), against the
    harness's server."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "flows.pipeline", "--repo", str(repo), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


# --- transient or deterministic -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, transient",
    [
        (_refused_connection, True),
        (lambda: TimeoutError("read timed out"), True),
        (lambda: subprocess.TimeoutExpired(["dvc", "status"], 30), True),
        (lambda: OSError(errno.EIO, "Input/output error"), True),
        (lambda: BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"), True),
        (lambda: _chained(_refused_connection()), True),
        (_missing_file, False),
        (lambda: PermissionError(errno.EACCES, "Permission denied", "data/ingested"), False),
        (lambda: OSError(errno.ENOSPC, "No space left on device"), False),
        (lambda: ValueError("train.epochs must be >= 1"), False),
        (lambda: _chained(ValueError("bad label"), KeyError), False),
    ],
    ids=["refused", "timeout", "subprocess-timeout", "EIO", "EAGAIN", "chained-refused", "missing-file",
         "permission", "disk-full", "ValueError", "chained-ValueError"],  # fmt: skip
)
def test_is_transient_on_real_exceptions(make, transient: bool) -> None:
    from flows.failures import is_transient

    assert is_transient(make()) is transient


def test_invalid_params_are_not_transient() -> None:
    from flows.failures import is_transient
    from tasks.config import ParamsError, load_params

    with pytest.raises(ParamsError) as info:
        load_params(REPO / "params.yaml", {"train.epochs": -3})
    assert not is_transient(info.value)


TRAIN_CMD = ("python -m tasks.train --params params.yaml --task classify --input data/preprocessed/classify "
             "--output models/classify/train")


@pytest.mark.parametrize(
    "lines, stage, errors, transient",
    [
        (  # DVC refuses before the stage's command runs: a missing input folder
            ["ERROR: failed to reproduce 'ingest': [Errno 2] No such file or directory: '/r/data/nowhere'"],
            "ingest", ["[Errno 2] No such file or directory: '/r/data/nowhere'"], False,
        ),
        (  # the stage's command printed its reason and exited 1
            ["Running stage 'ingest':", "> python -m tasks.ingest --params params.yaml --output data/ingested",
             "ingest: no files found under data/empty",
             "ERROR: failed to reproduce 'ingest': failed to run: python -m tasks.ingest, exited with 1"],
            "ingest",
            ["ingest: no files found under data/empty", "failed to run: python -m tasks.ingest, exited with 1"], False,
        ),
        (  # a traceback: its exception line(s), not the frames; a multi-line message is kept whole
            ["Running stage 'train':", f"> {TRAIN_CMD}", "epoch 1/3: loss 0.7", "Traceback (most recent call last):",
             '  File "/r/tasks/train.py", line 9, in <module>', "    main()",
             "tasks.schema.ParamsError: params.yaml: invalid params:", "  train.lr: Input should be greater than 0",
             f"ERROR: failed to reproduce 'train': failed to run: {TRAIN_CMD}, exited with 1"],
            "train", ["tasks.schema.ParamsError: params.yaml: invalid params:",
                      "  train.lr: Input should be greater than 0", f"failed to run: {TRAIN_CMD}, exited with 1"],
            False,
        ),
        (  # the MLflow server is down: transient
            ["Running stage 'train':", "Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
             "requests.exceptions.ConnectionError: HTTPConnectionPool(host='mlflow', port=5000): Max retries exceeded",
             f"ERROR: failed to reproduce 'train': failed to run: {TRAIN_CMD}, exited with 1"],
            "train", ["requests.exceptions.ConnectionError: HTTPConnectionPool(host='mlflow', port=5000): Max retries "
                      "exceeded", f"failed to run: {TRAIN_CMD}, exited with 1"], True,
        ),
        (  # MLflow's sqlite store busy: transient
            ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
             "sqlite3.OperationalError: database is locked",
             "ERROR: failed to reproduce 'promote': failed to run: python -m tasks.promote, exited with 1"],
            "promote", ["sqlite3.OperationalError: database is locked",
                        "failed to run: python -m tasks.promote, exited with 1"], True,
        ),
        (  # the stage named in an experiment's error (dvc.yaml:<stage>) wins over the one passed
            ["Reproducing experiment 'x'", "Running stage 'evaluate@classify':",
             "ERROR: failed to reproduce 'dvc.yaml:evaluate@classify': [Errno 5] Input/output error: "
             "'models/classify/train'"],
            "evaluate@classify", ["[Errno 5] Input/output error: 'models/classify/train'"], True,
        ),
        (  # killed (the kernel's OOM killer): its last line is where it was, not why
            ["Running stage 'train':", "epoch 3/30: loss 0.5 val_auc 0.8",
             f"ERROR: failed to reproduce 'train': failed to run: {TRAIN_CMD}, exited with -9"],
            "train", ["the stage's process was killed by SIGKILL (out of memory?)",
                      f"failed to run: {TRAIN_CMD}, exited with -9"], False,
        ),
    ],
    ids=["missing-input", "stage-message", "traceback", "mlflow-down", "sqlite-locked", "experiment", "killed"],
)
def test_stage_failure_names_the_stage_and_its_error(lines: list[str], stage: str, errors: list[str],
                                                     transient: bool) -> None:  # fmt: skip
    from flows.failures import StageFailed, is_transient

    exc = StageFailed.from_output("somewhere", 1, lines)
    assert (exc.stage, exc.errors, is_transient(exc)) == (stage, errors, transient)
    assert str(exc).startswith(f"stage {stage} failed: {errors[0]}")
    again = pickle.loads(pickle.dumps(exc))  # a failed state's exception may be persisted
    assert (str(again), again.transient) == (str(exc), exc.transient)


@pytest.fixture
def small_repo(tmp_path: Path) -> Path:
    return copy_repo(tmp_path)


def test_dvc_status_failure_carries_dvcs_error(small_repo: Path) -> None:
    """``dvc status --json`` prints nothing when it fails: the error must still say what DVC said, with the line."""
    from flows.failures import StageFailed, is_transient
    from flows.pipeline import changed_stages, stage_names

    dvc_yaml = small_repo / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("    deps:", "    deps: [", 1))
    with pytest.raises(StageFailed) as info:
        changed_stages.fn(small_repo, stage_names(["classify"]))
    message = str(info.value)
    assert message.startswith("`dvc status` failed: './dvc.yaml' is invalid."), message
    assert "line " in message and "column" in message, message
    assert not is_transient(info.value)


def test_a_held_dvc_lock_is_transient(small_repo: Path) -> None:
    """Another DVC process holding the repo's lock (DVC's own lock file, held here) fails ``dvc status`` with a
    transient error; once released, the same call works."""
    from dvc.lock import make_lock

    from flows.failures import StageFailed, is_transient
    from flows.pipeline import changed_stages, stage_names

    names = stage_names(["classify"])
    (small_repo / ".dvc/tmp").mkdir(parents=True, exist_ok=True)
    lock = make_lock(str(small_repo / ".dvc/tmp/lock"))
    lock.lock()
    try:
        with pytest.raises(StageFailed) as info:
            changed_stages.fn(small_repo, names)
    finally:
        lock.unlock()
    assert "Unable to acquire lock" in str(info.value)
    assert is_transient(info.value)
    assert "synth" in changed_stages.fn(small_repo, names)


# --- live output --------------------------------------------------------------------------------------------------

HANDSHAKE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    acks, done = Path(sys.argv[1]), Path(sys.argv[2])
    for i in range(3):
        print(f"line {i}")  # no flush: PYTHONUNBUFFERED from stage_env() must make it leave at once
        deadline = time.monotonic() + 60  # a guard against a hang, not a timing assert
        while not (acks / f"ack-{i}").exists():
            if time.monotonic() > deadline:
                print(f"line {i} was not relayed while the process ran")
                sys.exit(3)
            time.sleep(0.01)
    done.touch()
""")


def test_lines_are_relayed_while_the_process_runs(tmp_path: Path, monkeypatch) -> None:
    """Each line reaches the callback before the child goes on: the child waits for the callback's acknowledgement
    of line i before printing line i+1, and marks its exit; had the relay buffered, it would give up (exit 3)."""
    from flows.stream import stage_env, stream

    acks, done = tmp_path / "acks", tmp_path / "done"
    acks.mkdir()
    received: list[tuple[str, bool]] = []

    def on_line(line: str) -> None:
        received.append((line, done.exists()))
        if line.startswith("line "):
            (acks / f"ack-{line.split()[1]}").touch()

    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # the child must get it from stage_env()
    env = stage_env(terminal=False)
    rc, lines = stream([sys.executable, "-c", HANDSHAKE, str(acks), str(done)], tmp_path, env, on_line)
    assert rc == 0, received
    assert received == [("line 0", False), ("line 1", False), ("line 2", False)]
    assert lines == ["line 0", "line 1", "line 2"] and done.exists()


BARS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tqdm import tqdm
    acks = Path(sys.argv[1])
    for epoch in (1, 2):
        bar = tqdm(total=50, desc=f"epoch {epoch}/2", unit="batch", leave=False, mininterval=0)
        for i in range(50):
            bar.update()
            deadline = time.monotonic() + 60  # a guard against a hang, not a timing assert
            # a drawn bar waits until the relay has shown it, so that it is not all in one read with the epoch line
            while i == 10 and not bar.disable and not (acks / f"bar-{epoch}").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        bar.close()
        print(f"epoch {epoch}/2: loss 0.5000 val_auc 0.7500")
    print("Use `dvc push` to send your updates to remote storage.")
    print("Updating lock file 'dvc.lock'")
""")


@pytest.mark.parametrize("terminal", [False, True], ids=["log", "terminal"])
def test_progress_bars_collapse_to_one_line_per_epoch(tmp_path: Path, terminal: bool) -> None:
    """tqdm's carriage-return updates never reach the log: one line per epoch. On a terminal the bar is drawn live
    (its states go to ``on_progress``, then cleared); in a log the stages are told not to draw it at all. DVC's
    ``dvc push`` hint is dropped, its other lines kept."""
    from flows.stream import TerminalBar, stage_env, stream

    states: list[str] = []
    logged: list[str] = []
    screen = io.StringIO()
    bar = TerminalBar(screen)

    def on_progress(state: str) -> None:
        states.append(state)
        bar(state)
        if "%|" in state:
            (tmp_path / f"bar-{state.split()[1].split('/')[0]}").touch()

    rc, lines = stream([sys.executable, "-c", BARS, str(tmp_path)], tmp_path, stage_env(terminal=terminal),
                       logged.append, on_progress)  # fmt: skip
    assert rc == 0
    assert logged == lines == ["epoch 1/2: loss 0.5000 val_auc 0.7500", "epoch 2/2: loss 0.5000 val_auc 0.7500",
                               "Updating lock file 'dvc.lock'"]  # fmt: skip
    bars = [s for s in states if "batch" in s]
    if terminal:
        assert any(s.startswith("epoch 1/2:") and "%|" in s for s in bars), states
        assert any(s.startswith("epoch 2/2:") and "%|" in s for s in bars), states
        assert states[-1] == "", "the bar is cleared when the output ends"
        assert "\repoch 1/2:" in screen.getvalue() and screen.getvalue().endswith("\r\x1b[K")
    else:
        assert bars == [], "a log's stages draw no bars (TQDM_DISABLE)"


FIT = textwrap.dedent("""
    import tempfile
    from pathlib import Path
    import torch
    from tasks.config import load_params
    from tasks.models.fit import Splits, TorchFit, configure_torch
    from tasks.train import model_spec

    p = load_params("params.yaml", {"train.arch": "resnet10", "train.epochs": 2, "train.batch_size": 4,
                                    "train.num_threads": 1, "train.device": "cpu"})
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 1, 16, 16, generator=g), torch.arange(24) % 2
    meta = {"spatial_dims": 2, "in_channels": 1, "num_classes": 2, "input_shape": [1, 16, 16],
            "class_names": ["normal", "lesion"]}
    data = Splits(x[:16], y[:16], x[16:], y[16:], meta)
    job = TorchFit(p.train, model_spec(p.train, meta), data, 0, 1, configure_torch(0, p.train),
                   Path(tempfile.mkdtemp()), "fp")
    job.fit(0, lambda record: None, {})
""")


@pytest.mark.slow
def test_fit_writes_one_line_per_epoch_to_a_log(tmp_path: Path) -> None:
    """The training loop itself (tasks.models.fit): piped to a log it prints one line per epoch and no
    carriage-return bar; told its output ends on a terminal (the flow's MEDPIPE_PROGRESS=1), it draws the bar,
    which the relay collapses to the same lines (the drawn output is replayed through ``cat``: whatever the reads'
    boundaries, the log gets the epoch lines only)."""
    from flows.stream import stage_env, stream

    env = {k: v for k, v in os.environ.items() if k not in ("MEDPIPE_PROGRESS", "TQDM_DISABLE")}
    merged = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "timeout": 300}  # as DVC's child writes
    plain = subprocess.run([sys.executable, "-c", FIT], cwd=REPO, env=env, **merged)
    out = plain.stdout.decode()
    assert plain.returncode == 0, out[-2000:]
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert "\r" not in out, "a log got carriage-return bar updates"
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"], out

    drawn = subprocess.run([sys.executable, "-c", FIT], cwd=REPO, env={**env, "MEDPIPE_PROGRESS": "1"}, **merged)
    raw = drawn.stdout
    assert drawn.returncode == 0, raw.decode()[-2000:]
    assert b"\r" in raw and b"batch" in raw, "told it ends on a terminal, fit drew no bar"
    (tmp_path / "raw.txt").write_bytes(raw)
    rc, lines = stream(["cat", str(tmp_path / "raw.txt")], tmp_path, stage_env(terminal=False), lambda line: None)
    assert rc == 0
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"], lines
    assert not [line for line in lines if "batch" in line], "a bar update reached the log"


# --- the flow, failing --------------------------------------------------------------------------------------------


def _console_report(res: subprocess.CompletedProcess) -> str:
    return f"exit {res.returncode}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"


@pytest.mark.slow
def test_missing_input_folder_fails_once_with_one_message(tmp_path: Path, api_url: str) -> None:
    """The CLI on a params.yaml whose ingest.input does not exist: the ingest task fails on its first run (it has
    retries, none is used), the console says which stage and why in a few lines, and the traceback is only in the
    log file whose path it prints."""
    from flows.pipeline import RETRIES

    assert RETRIES["ingest"] >= 1, "ingest must have retries for this test to show they are not used"
    repo = copy_repo(tmp_path, {"ingest.input": "data/nowhere"})
    res = _cli(repo, api_url)
    console = res.stdout + res.stderr
    report = _console_report(res)
    assert res.returncode == 1, report
    assert len(console.splitlines()) < CONSOLE_MAX_LINES, report
    assert "Traceback" not in console, report
    assert f"stage ingest failed: [Errno 2] No such file or directory: '{repo / 'data/nowhere'}'" in res.stderr, report
    (log_line,) = [line for line in res.stderr.splitlines() if line.startswith("Full log")]
    log = Path(log_line.split(": ", 1)[1])
    log = log if log.is_absolute() else REPO / log
    assert log.parent == repo / "reports/logs", log
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "flows.failures.StageFailed: stage ingest failed" in text
    ignored = subprocess.run(["git", "check-ignore", "-q", str(log.relative_to(repo))], cwd=repo)
    assert ignored.returncode == 0, f"{log} is not git-ignored"

    flow_run = _flow_run_for(repo)
    assert flow_run.state.is_failed()
    runs = {r.name: r for r in _task_runs(flow_run.id)}  # each stage's task run is named after its DVC stage
    assert runs["stage-ingest"].state.is_failed() and runs["stage-ingest"].run_count == 1
    assert "AwaitingRetry" not in _state_names(runs["stage-ingest"].id)
    assert not [n for n in runs if n.startswith("stage-preprocess")], "a stage after the failed one ran"


@pytest.mark.slow
def test_yaml_syntax_error_names_the_file_and_line(tmp_path: Path, api_url: str) -> None:
    repo = copy_repo(tmp_path)
    params = repo / "params.yaml"
    text = params.read_text().splitlines()
    lineno = next(i for i, line in enumerate(text, 1) if line.startswith("  epochs:"))
    text[lineno - 1] = text[lineno - 1].replace("epochs: ", "epochs: [", 1)
    params.write_text("\n".join(text) + "\n")
    res = _cli(repo, api_url)
    report = _console_report(res)
    assert res.returncode == 2, report
    assert f"{params}: not valid YAML" in res.stderr and f"line {lineno}," in res.stderr, report
    assert "Traceback" not in res.stdout + res.stderr, report
    assert len((res.stdout + res.stderr).splitlines()) < CONSOLE_MAX_LINES, report
    assert not (repo / "data").exists(), "a stage ran although params.yaml is not valid YAML"


# --- the flow, retrying -------------------------------------------------------------------------------------------

FAIL_ONCE = ("python -c \"import pathlib, socket, sys; m = pathlib.Path(sys.argv[1]); "
             "m.exists() or (m.touch(), {raise_it})\" {marker} {port} && ")  # fmt: skip
RAISES = {
    # a real refused connection (a server that is not up yet): transient
    "transient": "socket.create_connection(('127.0.0.1', int(sys.argv[2])))",
    # bad input: deterministic
    "deterministic": "int('not a number')",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["transient", "deterministic"])
def test_only_transient_stage_failures_are_retried(tmp_path: Path, harness, kind: str) -> None:
    """The synth stage's command, in a throw-away repo, fails its first run: with a refused connection (retried,
    then it passes) or with a ValueError (not retried: the task fails after one run)."""
    from prefect import flow

    from flows.failures import StageFailed
    from flows.pipeline import RETRIES, STAGE_TASKS

    assert RETRIES["synth"] >= 1, "synth must have retries for this test to tell the cases apart"
    repo = copy_repo(tmp_path / "repo")
    dvc_yaml = repo / "dvc.yaml"
    prefix = FAIL_ONCE.format(raise_it=RAISES[kind], marker=tmp_path / "failed-once", port=_closed_port())
    cmd = "cmd: python -m tasks.synth"
    dvc_yaml.write_text(dvc_yaml.read_text().replace(cmd, cmd.replace("python", prefix + "python", 1)))

    @flow(name="one-stage")
    def one_stage(repo: str) -> dict[str, Any]:
        return STAGE_TASKS["synth"](Path(repo))

    state = one_stage(str(repo), return_state=True)
    (run,) = _task_runs(state.state_details.flow_run_id)
    names = _state_names(run.id)
    assert (tmp_path / "failed-once").exists(), "the stage's command did not run"
    if kind == "transient":
        assert state.is_completed(), state.message
        assert run.run_count == 2 and "AwaitingRetry" in names, names
        assert (repo / "data/synthetic").is_dir()
    else:
        assert state.is_failed() and run.run_count == 1 and "AwaitingRetry" not in names, names
        with pytest.raises(StageFailed, match=r"stage synth failed: ValueError: invalid literal for int\(\)"):
            state.result()
