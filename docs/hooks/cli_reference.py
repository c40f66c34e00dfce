"""mkdocs hook: the CLI reference page, generated from the ``fastervit`` parsers at build time.

``docs/cli.md`` holds the marker ``<!-- cli-reference -->``; this hook replaces it with the ``--help`` text of every
command in ``open_fastervit.cli.COMMANDS`` and of every sub-command (``fastervit detect train`` ...). A command
module with ``build_parser()`` is read through its parser (argparse sub-parsers included); a command without one
(``detect``, ``segment``) is run with ``--help`` and its sub-commands are read from the ``{a,b,c}`` of its usage
line. The page therefore always matches the installed code; an import error fails the build.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
from typing import Any

MARKER = "<!-- cli-reference -->"
WIDTH = "100"  # argparse wraps help text at $COLUMNS


def _run_help(argv: list[str]) -> str:
    """The text ``fastervit ARGV --help`` prints (stdout), whether it returns or exits through SystemExit."""
    from open_fastervit.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        main([*argv, "--help"])
    return buffer.getvalue().rstrip()


def _sub_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Sub-command name -> parser for a parser built with ``add_subparsers`` (empty otherwise)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _command_helps(name: str) -> list[tuple[str, str]]:
    """``[(invocation, help text), ...]`` for one command and its sub-commands, in order."""
    module = importlib.import_module(f"open_fastervit.cli.{name}")
    build = getattr(module, "build_parser", None)
    if build is not None:
        parser = build()
        helps = [(f"fastervit {name}", parser.format_help().rstrip())]
        helps += [(f"fastervit {name} {sub}", p.format_help().rstrip()) for sub, p in _sub_parsers(parser).items()]
        return helps
    text = _run_help([name])
    helps = [(f"fastervit {name}", text)]
    usage = text.splitlines()[0] if text else ""
    braces = re.search(r"\{([\w,-]+)\}", usage)
    for sub in braces.group(1).split(",") if braces else []:
        helps.append((f"fastervit {name} {sub}", _run_help([name, sub])))
    return helps


def render() -> str:
    """The Markdown of the whole reference: an overview table, then one section per command."""
    from open_fastervit.cli import COMMANDS

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        lines = ["| command | what it does |", "|---|---|"]
        lines += [f"| [`fastervit {name}`](#fastervit-{name}) | {text} |" for name, text in COMMANDS.items()]
        for name in COMMANDS:
            for index, (invocation, text) in enumerate(_command_helps(name)):
                anchor = invocation.replace(" ", "-")
                level = "##" if index == 0 else "###"
                lines += ["", f"{level} `{invocation}` {{#{anchor}}}", "", "```text", text, "```"]
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs event: fill the marker of the CLI page."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
