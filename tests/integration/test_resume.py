"""`mgrpo train` run again on its run directory: a damaged newest checkpoint is moved aside and the
previous one resumed, and summary.json counts the wall time of every process of the run."""

import json
import os
import time

import pytest

from megatron_mgrpo.metrics import read_metrics
from tests.helpers import cache, run_cli  # noqa: F401  (cache: a fresh model cache, autouse)


def stored_wall_seconds(checkpoint) -> float:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(checkpoint))["common"]["user"]["wall_seconds"]


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_and_wall_time_adds_up(tmp_path):
    run = tmp_path / "run"
    run_cli(run, "train.steps=2", "eval.interval=2")
    checkpoints = run / "checkpoints"
    first_process = stored_wall_seconds(checkpoints / "step_000001")
    assert first_process > 0
    shard = checkpoints / "step_000002" / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)  # a disk that filled up while it was written

    started = time.perf_counter()
    out = run_cli(run, "train.steps=3", "eval.interval=2")  # the same run, one step longer
    second_process = time.perf_counter() - started
    assert f"cannot read {checkpoints / 'step_000002'}: __0_0.distcp (cut off: " in out.stdout
    assert "trying the previous checkpoint" in out.stdout
    assert f"resumed from {checkpoints / 'step_000001'} (step 1)" in out.stdout
    assert (checkpoints / "step_000002.corrupt-1" / "__0_0.distcp").is_file()  # kept, renamed, for a look
    assert (checkpoints / "step_000003" / "complete.json").is_file()
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert first_process < summary["wall_seconds"] <= first_process + second_process + 0.1
