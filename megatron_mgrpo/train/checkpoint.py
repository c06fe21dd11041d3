"""Distributed checkpoints: megatron-core `dist_checkpointing` under a crash-safe directory layout.

A checkpoint holds the model's sharded state, optionally the optimizer's and the momentum (EMA)
shards, and common state (step, scheduler, data position: whatever the trainer passes) plus the
RNG states. Tensors are stored by their global identity (ShardedTensor keys and offsets; a MoE
expert by its global index), so a checkpoint saved under one TP / PP / EP layout loads under
another: dist_checkpointing reshards (also a MoE model's optimizer state between EP=1 and EP>1:
`models.provider.build_gpt_model` marks experts as expert-parallel at every EP size).

Layout: `<run>/checkpoints/step_000123/`. Every rank writes into `step_000123.tmp-<pid>` first;
after a barrier rank 0 writes the completion marker and renames the directory, and only then
deletes checkpoints beyond the last `keep_last`. A process killed at any point therefore leaves
either the new complete checkpoint or the temporary directory next to the previous complete one,
and `latest_checkpoint` never picks a temporary or unmarked directory. A run directory has one
writing job at a time: a save removes temporary directories that earlier, killed saves left behind.
A complete checkpoint whose files were damaged later (a full disk, a copy cut short) is moved
aside by `load_latest_checkpoint`, which resumes from the previous one instead.

The momentum copy is a name -> fp32 tensor mapping per model chunk with exactly the parameters'
shapes; each entry is stored as a ShardedTensor with its parameter's sharding metadata under the
key `momentum.<parameter key>`, so it reshards exactly like the weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_mgrpo.train import CheckpointError
from megatron_mgrpo.train.checkpoint_state import (
    OPTIMIZER_METADATA,
    as_list,
    chunk_key,
    copy_into,
    layout,
    materialise_optimizer_state,
    model_state,
    only_models,
    rng_sharded_object,
    set_rng_state,
    unshare_adam_steps,
    unwrapped,
)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "complete.json"
#: Non-tensor files (e.g. the HF config and tokenizer) that travel with a checkpoint.
FILES_DIR = "hf"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)")
_TEMP_DIR = re.compile(r"step_\d+\.tmp-\d+")
#: what a checkpoint that does not load is renamed to (`<name>.corrupt-<n>`): never picked or pruned
CORRUPT_SUFFIX = ".corrupt-"

class UnreadableCheckpoint(CheckpointError):
    """A complete checkpoint whose files cannot be read."""


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """What `load_checkpoint` restored besides the tensors it copied in place."""

    path: Path
    step: int
    common: dict[str, Any]  # the `common` mapping given to save_checkpoint
    rng_restored: bool  # False when the layout changed (per-rank RNG streams do not carry over)


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the complete checkpoint of `step` lives."""
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary and unmarked directories are skipped)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and (p / COMPLETE_MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_chunks, *, optimizer=None, scheduler=None,
                    momentum: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]] | None = None,
                    common: Mapping[str, Any] | None = None, keep_last: int | None = 3,
                    files_from: str | os.PathLike | None = None) -> Path:
    """Save a checkpoint of `step` on every rank (a collective call) and return its directory.

    `model_chunks`: the model, or its list of virtual-pipeline chunks (DDP-wrapped or not).
    `optimizer`: a megatron-core optimizer; `scheduler`: anything with `state_dict()` /
    `load_state_dict()` (megatron's OptimizerParamScheduler). `momentum`: per chunk (or one mapping
    for one chunk), the parameter name -> tensor mapping of the EMA copy. `common`: picklable state
    identical on all ranks (data position, run statistics, ...). `keep_last`: complete checkpoints
    to keep (None keeps all). `files_from`: a directory whose top-level non-weight files (HF config,
    tokenizer) are copied into the checkpoint's `hf/` folder.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1 (or None to keep every checkpoint)")
    from megatron.core import dist_checkpointing

    chunks = unwrapped(model_chunks)
    state = model_state(chunks, as_list(momentum) if momentum is not None else None)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(only_models(state), metadata=OPTIMIZER_METADATA)
    state["rng_state"] = rng_sharded_object()
    state["common"] = {"format_version": FORMAT_VERSION, "step": step, "layout": layout(len(chunks)),
                       "parts": [name for name, part in (("optimizer", optimizer), ("scheduler", scheduler),
                                                         ("momentum", momentum)) if part is not None],
                       "scheduler": scheduler.state_dict() if scheduler is not None else None,
                       "user": dict(common or {})}
    started = time.perf_counter()
    final = checkpoint_dir(run_dir, step)
    temp = _agree_on_temp_dir(final)
    dist_checkpointing.save(state, str(temp))
    dist.barrier()
    if dist.get_rank() == 0:
        if files_from is not None:
            copy_non_weight_files(files_from, temp / FILES_DIR)
        (temp / COMPLETE_MARKER).write_text(json.dumps({"step": step, "saved_at": time.time()}))
        _publish(temp, final)
        _prune(Path(run_dir), keep_last)
        log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - started)
    dist.barrier()
    return final


def saved_common_state(path: str | Path) -> dict[str, Any]:
    """What save_checkpoint recorded beside the tensors: step, layout, the parts saved (model,
    optimizer, scheduler, momentum) and the caller's `common` mapping (under "user")."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_common_state_dict(str(path))["common"]
    except Exception as err:
        raise UnreadableCheckpoint(f"cannot read {path}: its common state (common.pt): {_last_line(err)}") from err


def load_checkpoint(path: str | os.PathLike, model_chunks, *, optimizer=None, scheduler=None,
                    momentum: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]] | None = None,
                    load_model: bool = True, restore_rng: bool = True) -> LoadedCheckpoint:
    """Load a complete checkpoint into `model_chunks` (and `optimizer`, `momentum`) in place.

    Works under any TP / PP / EP layout whose model has the same global tensors. `momentum`
    tensors are filled in place; `load_model=False` loads only the other parts (e.g. the momentum
    straight into the model's own parameters for an export). RNG states are restored only when the
    layout (world size, TP, PP, EP) equals the saved one, since they are per rank (megatron seeds
    the experts' stream by EP rank).
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER}); "
                                f"use latest_checkpoint(run_dir) to find the newest complete one")
    saved = saved_common_state(path)
    for name, part in (("optimizer", optimizer), ("scheduler", scheduler), ("momentum", momentum)):
        if part is not None and name not in saved["parts"]:
            raise ValueError(f"{path} was saved without the {name}: load it without `{name}=`")
    chunks = unwrapped(model_chunks)
    state = model_state(chunks, as_list(momentum) if momentum is not None else None)
    if optimizer is not None:
        materialise_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(only_models(state), is_loading=True,
                                                          metadata=OPTIMIZER_METADATA)
    if not load_model:
        state = {key: value for key, value in state.items() if not key.startswith("model")}
    same_layout = saved["layout"] == layout(len(chunks))
    if restore_rng and same_layout:
        state["rng_state"] = rng_sharded_object()
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as err:  # torch's reader raises the latter, a BaseException
        damaged = ", ".join(_damaged_files(path)) or "its tensors"
        raise UnreadableCheckpoint(f"cannot read {path}: {damaged}: {_last_line(err)}") from err
    if load_model:
        for index, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[chunk_key(index, len(chunks))], strict=True)
    if momentum is not None:
        for index, tensors in enumerate(as_list(momentum)):
            copy_into(tensors, loaded[f"momentum_{chunk_key(index, len(chunks))}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_steps(optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(saved["scheduler"])
    if "rng_state" in state:
        set_rng_state(loaded["rng_state"])
    return LoadedCheckpoint(path=path, step=saved["step"], common=saved["user"], rng_restored="rng_state" in state)


def load_latest_checkpoint(run_dir: str | os.PathLike, model_chunks, *, optimizer=None, scheduler=None,
                           momentum: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]] | None = None,
                           say: Callable[[str], Any] = log.warning) -> LoadedCheckpoint | None:
    """Load the newest complete checkpoint of `run_dir` that reads, as `load_checkpoint` (a collective
    call); None when the run has none.

    A checkpoint that cannot be read is reported through `say` and the previous one is tried. Once
    one loads, rank 0 renames the newer ones to `<name>.corrupt-<n>`: kept for inspection, never
    picked again, and out of the way of the step's next save. When none loads, nothing is moved
    (the cause may then be this run's model, not the files) and CheckpointError lists them all.

    Every rank tries each checkpoint and the ranks agree on the outcome, so all resume from the
    same one; torch's distributed reader raises on every rank when one rank's read fails, so no
    rank is left waiting in a collective of a load that the others gave up.
    """
    failed: list[tuple[Path, str]] = []
    newest_first = complete_checkpoints(run_dir)[::-1]
    for index, path in enumerate(newest_first):
        error = None
        try:
            loaded = load_checkpoint(path, model_chunks, optimizer=optimizer, scheduler=scheduler, momentum=momentum)
        except UnreadableCheckpoint as err:
            error = str(err)
        error = _any_rank_error(error)
        if error is None:
            if failed:
                unreadable = [failed_path for failed_path, _ in failed]
                moved = _move_aside(unreadable)
                say("moved the unreadable checkpoints aside: " +
                    ", ".join(f"{old.name} -> {new.name}" for old, new in zip(unreadable, moved)))
            return loaded
        say(error + ("; trying the previous checkpoint" if index + 1 < len(newest_first) else ""))
        failed.append((path, error))
    if failed:
        raise CheckpointError(f"no checkpoint of {run_dir} loads ({'; '.join(error for _, error in failed)}): "
                              f"check that model.path is the run's model, or move {Path(run_dir) / CHECKPOINTS} "
                              f"aside to start the run afresh")
    return None


def _any_rank_error(error: str | None) -> str | None:
    """The first rank's error of a load (None when every rank loaded), the same on every rank."""
    if dist.get_world_size() == 1:
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def _move_aside(paths: list[Path]) -> list[Path]:
    """Rank 0 renames each checkpoint to a free `<name>.corrupt-<n>`; every rank returns the new names."""
    names: list = [None]
    if dist.get_rank() == 0:
        names = [[]]
        for path in paths:
            number = 1
            while (target := path.with_name(f"{path.name}{CORRUPT_SUFFIX}{number}")).exists():
                number += 1
            path.rename(target)
            names[0].append(str(target))
    dist.broadcast_object_list(names, src=0)  # also keeps every rank from going on before the renames
    return [Path(name) for name in names[0]]


def _damaged_files(path: Path) -> list[str]:
    """The files of a checkpoint that are missing or shorter than torch's `.metadata` records, each
    with what is wrong (`.metadata` itself when it does not read): damage that can be named
    without reading any tensor. Empty when every file has its full size."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception:
        return [".metadata (unreadable)"]
    ends: dict[str, int] = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    damaged = []
    for name, end in sorted(ends.items()):
        if not (path / name).is_file():
            damaged.append(f"{name} (missing)")
        elif (size := (path / name).stat().st_size) < end:
            damaged.append(f"{name} (cut off: {size} of {end} bytes)")
    return damaged


def _last_line(err: BaseException) -> str:
    """A one-line cause: torch's CheckpointException carries every rank's traceback in its text."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def copy_non_weight_files(source: str | os.PathLike, target: Path) -> None:
    """Copy the top-level files of an HF directory except the weights (config, tokenizer, ...)."""
    target.mkdir(parents=True, exist_ok=True)
    for item in Path(source).iterdir():
        if item.is_file() and not _is_weight_file(item.name):
            shutil.copy2(item, target / item.name)


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json"))


def _agree_on_temp_dir(final: Path) -> Path:
    """Rank 0 creates `<final>.tmp-<its pid>` and every rank learns the name."""
    name = [None]
    if dist.get_rank() == 0:
        temp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        temp.mkdir(parents=True)
        name = [str(temp)]
    dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def _publish(temp: Path, final: Path) -> None:
    """Rename the finished temporary directory to its final name (an older save of the same step
    is moved aside first and deleted after, so a complete checkpoint of the step always exists)."""
    aside = None
    if final.exists():
        aside = final.with_name(f"{final.name}.tmp-{os.getpid()}-replaced")
        final.rename(aside)
    temp.rename(final)
    if aside is not None:
        shutil.rmtree(aside)


def _prune(run_dir: Path, keep_last: int | None) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, and leftovers of killed saves."""
    complete = complete_checkpoints(run_dir)
    doomed = complete[:-keep_last] if keep_last is not None else []
    doomed += [p for p in (run_dir / CHECKPOINTS).iterdir() if _TEMP_DIR.match(p.name)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
