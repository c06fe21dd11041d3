"""Checkpoint conversion with Megatron-LM's `tools/checkpoint/convert.py` arguments, for scripts
written against it: the same code as `mgrpo convert` (megatron_mgrpo.convert), nothing else.

    python tools/checkpoint/convert.py --model-type GPT --loader hf --saver mgrpo \\
        --load-dir Qwen3-4B-Base --save-dir runs/qwen3-4b --target-tensor-parallel-size 2
    python tools/checkpoint/convert.py --model-type GPT --loader mgrpo --saver hf \\
        --load-dir runs/qwen3-4b --save-dir qwen3-4b-hf [--momentum]

`--loader hf --saver mgrpo` writes the step-0 distributed checkpoint of a run directory, which
loads under any TP / PP / EP layout (the target sizes are the ranks that write it); `--loader
mgrpo --saver hf` exports a checkpoint (or a run directory's newest) as an HF directory.
"""

from __future__ import annotations

import argparse
import sys

DIRECTIONS = {("hf", "mgrpo"): "hf-to-megatron", ("mgrpo", "hf"): "megatron-to-hf"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", required=True, choices=["GPT"], help="decoder-only models only")
    parser.add_argument("--loader", required=True, choices=["hf", "mgrpo"], help="format of --load-dir")
    parser.add_argument("--saver", required=True, choices=["hf", "mgrpo"], help="format to write to --save-dir")
    parser.add_argument("--load-dir", required=True, help="HF model directory, or checkpoint / run directory")
    parser.add_argument("--save-dir", required=True, help="run directory (saver mgrpo) or new HF directory")
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1)
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--target-expert-parallel-size", type=int, default=1)
    parser.add_argument("--momentum", action="store_true", help="export the momentum (EMA) copy (saver hf)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (saver hf)")
    return parser


def mgrpo_argv(args: argparse.Namespace) -> list[str]:
    """The `mgrpo convert` command line that does the same conversion."""
    direction = DIRECTIONS.get((args.loader, args.saver))
    if direction is None:
        raise SystemExit(f"--loader {args.loader} --saver {args.saver}: convert between hf and mgrpo")
    if direction == "hf-to-megatron":
        return ["convert", direction, "--hf", args.load_dir, "--out", args.save_dir,
                "--tp", str(args.target_tensor_parallel_size), "--pp", str(args.target_pipeline_parallel_size),
                "--ep", str(args.target_expert_parallel_size)]
    return ["convert", direction, "--ckpt", args.load_dir, "--out", args.save_dir,
            "--max-shard-size", args.max_shard_size, *(["--momentum"] if args.momentum else [])]


def main(argv: list[str] | None = None) -> int:
    from megatron_mgrpo.cli import main as mgrpo

    return mgrpo(mgrpo_argv(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
