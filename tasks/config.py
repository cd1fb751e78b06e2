"""Loading ``params.yaml``: validation against the schema (:mod:`tasks.schema`), overrides, the command line.

Every stage loads its settings through :func:`load_params`; unknown keys, wrong types and out-of-range values
fail before any work is done, with a message that names the file, the dotted key and the expected form.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tasks.schema import Params, ParamsError, describe_error

DEFAULT_PARAMS = Path("params.yaml")

def validate_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping.

    Args:
        raw: the parsed YAML mapping.
        source: where it came from, used in the error message.

    Raises:
        ParamsError: naming every offending dotted key and the expected form.
    """
    try:
        params = Params.model_validate(raw or {})
    except ValidationError as exc:
        lines = "\n  ".join(describe_error(e) for e in exc.errors())
        raise ParamsError(f"{source}: invalid params:\n  {lines}") from None
    for name in params.tasks:  # each task's merged groups, so a bad override fails before any stage runs
        try:
            params.for_task(name)
        except ParamsError as exc:
            raise ParamsError(f"{source}: {exc}") from None
    return params


def _yaml(typ: str = "rt"):
    from ruamel.yaml import YAML

    yaml = YAML(typ=typ)
    yaml.preserve_quotes = True
    if typ == "rt":  # write None as `null` (ruamel's round trip writes an empty value), as params.yaml spells it
        yaml.representer.add_representer(
            type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
        )
    return yaml


def read_yaml(path: Path | str) -> Any:
    """Parse a YAML file into plain Python data (dicts, lists, scalars)."""
    return _yaml("safe").load(Path(path).read_text())


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set dotted keys (``{"train.epochs": 1}``) in a params mapping, in place; returns it.

    A missing group on the way is created (validation then rejects an unknown one); a scalar on the way is an error.
    """
    for dotted, value in (overrides or {}).items():
        node = raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not hasattr(node, "keys"):
                raise ParamsError(f"override {dotted}: {part} is not a group")
        node[parts[-1]] = value
    return raw


def _read_mapping(path: Path, typ: str = "safe") -> Any:
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = _yaml(typ).load(path)
    except Exception as exc:  # ruamel's YAMLError subclasses: a syntax error, with its line
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    raw = {} if raw is None else raw
    if not hasattr(raw, "keys"):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return raw


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None,
                task: str | None = None) -> Params:  # fmt: skip
    """Load and validate params.yaml, applying dotted-key overrides (``{"train.epochs": 1}``); with ``task``, as
    that task sees them (:meth:`Params.for_task`)."""
    path = Path(path)
    raw = apply_overrides(_read_mapping(path), overrides)
    params = validate_params(raw, str(path) + (f" with overrides {overrides}" if overrides else ""))
    if task is not None:
        try:
            return params.for_task(task)
        except ParamsError as exc:
            raise ParamsError(f"{path}: {exc}") from None
    return params


def write_overrides(path: Path | str, overrides: dict[str, Any]) -> Params:
    """Validate dotted overrides against the schema, then write them into the YAML file (comments kept).

    The one writer of params files: the flow's experiments, ``dvc exp``-style grids and the tests use it.

    Raises:
        ParamsError: before anything is written, naming the key and the expected form.
    """
    import io
    import json

    path = Path(path)
    doc = apply_overrides(_read_mapping(path, "rt"), overrides)
    params = validate_params(json.loads(json.dumps(doc)), f"{path} with overrides {overrides}")
    buf = io.StringIO()
    _yaml("rt").dump(doc, buf)
    path.write_text(buf.getvalue())
    return params


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The stages' and flows' ``--help``: each option's help ends with its default, unless it has none (a required
    option, a flag, an optional input that falls back to a params key: the help says what then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def load_params_or_exit(path: Path | str = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None,
                        task: str | None = None) -> Params:  # fmt: skip
    """:func:`load_params` for a CLI: on bad params print the message and exit with status 2, before any work."""
    import sys

    try:
        return load_params(path, overrides, task)
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    """``python -m tasks.config [params.yaml] [--quiet]``: validate the whole file; print it, or fail naming the key
    (exit status 2). ``make`` and the flow run this before DVC decides anything."""
    import json

    ap = argparse.ArgumentParser(prog="python -m tasks.config", description=main.__doc__.splitlines()[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("params", nargs="?", default=str(DEFAULT_PARAMS), help="the params file to validate")
    ap.add_argument("--quiet", action="store_true", help="print nothing when the file is valid")
    args = ap.parse_args(argv)
    params = load_params_or_exit(args.params)
    if not args.quiet:
        print(json.dumps(params.model_dump(mode="json"), indent=2))


if __name__ == "__main__":
    main()
