"""The configuration reference (docs/config-reference.md), generated from the config schema.

Every leaf's `option(...)` metadata (help, choices, bounds, default) is the single source: a test
regenerates this text and compares it with the committed file, so the document cannot drift.

    python tools/config_reference.py > docs/config-reference.md
"""

from __future__ import annotations

import dataclasses
import typing

from megatron_mgrpo.config import Config, describe_range

HEADER = """# Configuration reference

Generated from `megatron_mgrpo/config.py` by `python tools/config_reference.py > docs/config-reference.md`;
do not edit by hand. Set any key in a YAML file passed with `--config`, or on the command line as
`section.key=value` (applied after the file). `mgrpo config show` prints the resolved tree.
"""


def config_reference() -> str:
    """Markdown: one table per config section, rows in declaration order."""
    parts = [HEADER]
    for name, cls, help_text in _sections(Config, ""):
        rows = ["| key | default | allowed | description |", "| --- | --- | --- | --- |"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            rows.append(f"| `{name}.{f.name}` | {_default(f)} | {_allowed(f, hints[f.name])} | "
                        f"{_cell(f.metadata['help'])} |")
        parts.append(f"## `{name}`\n\n{help_text[0].upper() + help_text[1:]}.\n\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def _sections(cls: type, prefix: str) -> list[tuple[str, type, str]]:
    """(dotted name, dataclass, help) of every section below `cls`, depth first."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            name = f"{prefix}{f.name}"
            found.append((name, hints[f.name], f.metadata["help"]))
            found += _sections(hints[f.name], f"{name}.")
    return found


def _default(f: dataclasses.Field) -> str:
    value = f.default
    return "`" + (str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str)
                  else f"{value:g}" if isinstance(value, float) else str(value)) + "`"


def _allowed(f: dataclasses.Field, kind: type) -> str:
    if f.metadata.get("choices"):
        return ", ".join(f"`{choice}`" for choice in f.metadata["choices"])
    bounds = describe_range(f.metadata)
    return f"{kind.__name__}, {bounds[len('must be '):]}" if bounds != "any value" else kind.__name__


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


if __name__ == "__main__":
    print(config_reference(), end="")
