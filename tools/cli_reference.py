"""Write the CLI reference page (docs/reference/cli.md) from the parser itself.

The flags of `features` and `head` come from the option metadata of their config dataclasses, the
others from `cli.build_parser`, so the page cannot say anything the program does not do. A test
regenerates it and fails when the committed page is stale: run `make docs` (or this module) then.

Usage: python tools/cli_reference.py [OUT.md]   (default: docs/reference/cli.md; `-` prints it)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "reference" / "cli.md"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _cell(text: str) -> str:
    """Help text as one Markdown table cell: pipes escaped, and angle brackets (ROOT/<class>) kept
    as text rather than read as HTML tags."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.dest.upper()}`" + (" (optional)" if action.nargs == "?" else "")
    names = [
        name for name in action.option_strings if not name.startswith("--no-")
    ] or action.option_strings
    shown = ", ".join(f"`{name}`" for name in names)
    if isinstance(action, argparse.BooleanOptionalAction):
        return (
            shown
            + " / "
            + ", ".join(f"`{n}`" for n in action.option_strings if n.startswith("--no-"))
        )
    if action.nargs == 0:
        return shown
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    if action.nargs in ("+", "*"):
        metavar += " ..."
    return f"{shown} `{metavar.replace('|', ' / ')}`"


def render() -> str:
    """The whole page, as Markdown."""
    sys.path.insert(0, str(REPO))
    from pipeline.cli import _Help, build_parser

    parser = build_parser()
    lines = [
        "# Command-line reference",
        "",
        "Generated from the program's own parser (`python tools/cli_reference.py`); `pipeline "
        "COMMAND --help`",
        "prints the same. Every flag of `features` and `head` can also be set in a TOML file's "
        "`[features]`",
        "or `[head]` table (see [Config files](../guide/features.md#config-files)).",
        "",
    ]
    for name, sub in _subcommands(parser).items():
        formatter = _Help(prog=sub.prog)
        lines += [
            f"## pipeline {name}",
            "",
            _cell(sub.description or ""),
            "",
            "```",
            sub.format_usage().strip(),
            "```",
            "",
        ]
        for group in sub._action_groups:
            actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            title = {"positional arguments": "arguments", "options": "general"}.get(
                group.title, group.title
            )
            lines += [f"**{title}**", "", "| flag | what it does |", "|---|---|"]
            for action in actions:
                lines.append(
                    f"| {_flag(action)} | {_cell(formatter._get_help_string(action) or '')} |"
                )
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    out = argv[0] if argv else str(DEFAULT_OUT)
    text = render()
    if out == "-":
        sys.stdout.write(text)
    else:
        Path(out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
