"""`mgrpo`: the command-line entry point.

Each subcommand parses its own arguments and imports its heavy dependencies only when it runs,
so `mgrpo --help` is instant and never touches torch or GPU-only libraries.
"""

from __future__ import annotations

import argparse
import sys

from megatron_mgrpo import __version__


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (defaults: the paper's recipe)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides applied after the file, e.g. algo.momentum=0.99")


def _config_show(args: argparse.Namespace) -> int:
    from megatron_mgrpo.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from megatron_mgrpo.data.preprocess import preprocess_file
    from megatron_mgrpo.data.records import FieldMap

    overrides = {name: getattr(args, f"{name}_field") for name in ("id", "question", "answer", "solution")}
    fields = FieldMap(**{k: v for k, v in overrides.items() if v is not None}) if any(overrides.values()) else None
    report = preprocess_file(args.input, args.output, style=args.style, fields=fields,
                             on_bad_row=args.on_bad_row, seed=args.seed)
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgrpo",
        description="M-GRPO: label-free reinforcement learning for reasoning on megatron-core.")
    parser.add_argument("--version", action="version", version=f"megatron_mgrpo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="inspect the configuration",
                                 description="Inspect the resolved configuration.")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser(
        "show", help="print the resolved config as YAML",
        description="Print the config that a run would use: defaults, then --config, then overrides.")
    _add_config_args(show)
    show.set_defaults(run=_config_show)

    prep = commands.add_parser(
        "preprocess", help="turn a local MATH / MATH-500 / AIME / GPQA-style file into prompt jsonl",
        description="Convert a local dataset file (jsonl, parquet or a Hugging Face datasets directory) "
                    "into megatron_mgrpo prompt jsonl: one {id, question, answer, solution} object per line. "
                    "The gold answer is taken from the answer column, else from the solution's last "
                    "\\boxed{}. Rows that cannot be used are reported with their file and line.")
    prep.add_argument("--input", required=True, help="input file or datasets directory")
    prep.add_argument("--output", required=True, help="output jsonl path (written atomically)")
    prep.add_argument("--style", default="auto", choices=("auto", "math", "aime", "gpqa", "generic"),
                      help="column conventions of the input (auto: detect from the columns)")
    for name in ("id", "question", "answer", "solution"):
        prep.add_argument(f"--{name}-field", help=f"input column holding the {name} (overrides the style)")
    prep.add_argument("--on-bad-row", default="skip", choices=("skip", "error"),
                      help="skip and count malformed rows, or stop at the first one")
    prep.add_argument("--seed", type=int, default=0, help="seed for shuffling multiple-choice options (gpqa)")
    prep.set_defaults(run=_preprocess)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_mgrpo.config import ConfigError
    from megatron_mgrpo.data.records import DataError

    try:
        return args.run(args)
    except (ConfigError, DataError) as err:
        print(f"mgrpo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
