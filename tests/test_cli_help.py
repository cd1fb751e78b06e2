"""Every command a user runs says, in --help, what each option does and its default."""

from __future__ import annotations

import argparse
import importlib

import pytest

COMMANDS = [
    "tasks.synth", "tasks.ingest", "tasks.preprocess", "tasks.train", "tasks.evaluate", "tasks.export",
    "tasks.promote", "tasks.config", "tasks.reporting.report", "tasks.reporting.plots_page",
    "flows.pipeline", "flows.serve",
]  # fmt: skip


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def parser_of(module: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser ``module.main`` builds: caught when it parses, before any work."""

    def capture(self: argparse.ArgumentParser, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Parsed) as caught:
        importlib.import_module(module).main([])
    return caught.value.parser


@pytest.mark.parametrize("module", COMMANDS)
def test_every_option_has_help_and_its_default(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = parser_of(module, monkeypatch)
    shows_defaults = issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    problems = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            problems.append(f"{name}: no help text")
        elif action.default not in (None, False, argparse.SUPPRESS) and not action.required:
            if not shows_defaults and "default" not in action.help:
                problems.append(f"{name}: its default ({action.default!r}) is not shown")
    assert parser.description, f"{module}: the parser has no description"
    assert not problems, f"python -m {module} --help: " + "; ".join(problems)


def test_help_prints_defaults() -> None:
    """The shared formatter prints a default where there is one, and not for a required option."""
    import contextlib
    import io

    from tasks.config import HelpFormatter

    ap = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    ap.add_argument("--epochs", type=int, default=30, help="passes over the training split")
    ap.add_argument("--output", required=True, help="where to write")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ap.print_help()
    text = " ".join(out.getvalue().split())
    assert "passes over the training split (default: 30)" in text
    assert "where to write (default" not in text
