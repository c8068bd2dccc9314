"""The one override syntax of every command: `--set KEY=VALUE`, repeatable.

Keys are dotted paths into the command's config (`common.config`); values are read as YAML. A command with
two configs routes each key by its first part: `eval` sends `load.*` / `options.*` to the inference config
and `judge.*` to the WISE judge; `demo` sends `load.*` / `options.*` to inference, everything else to training.
"""

from __future__ import annotations

import argparse

from common.config import ConfigError, parse_override


def add_set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"config override, dotted key = YAML value (repeatable), e.g. --set {example}",
    )


def split_overrides(items: list[str], sections: tuple[str, ...], rest: str | None = None) -> dict[str, list[str]]:
    """Route each `a.b=value` by its first part to one of `sections` (or to `rest` when given; else refused)."""
    routed: dict[str, list[str]] = {name: [] for name in (*sections, *([rest] if rest else []))}
    for item in items:
        parts, _ = parse_override(item)
        if parts[0] in sections:
            routed[parts[0]].append(item)
        elif rest:
            routed[rest].append(item)
        else:
            raise ConfigError(f"--set {item!r}: expected a key under {' | '.join(f'{s}.' for s in sections)}")
    return routed


def strip_section(items: list[str]) -> list[str]:
    """`judge.model=x` -> `model=x`: overrides of one section, as keys of that section's own config."""
    return [item.split(".", 1)[1] for item in items]
