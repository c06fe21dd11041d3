"""Our SGLang request bodies, checked against SGLang's own request types (io_struct 0.5.23)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_mgrpo.rollout import SamplingParams
from megatron_mgrpo.rollout.sglang_protocol import (
    distributed_update_payload,
    generate_payload,
    init_group_payload,
    tensor_update_payload,
)
from megatron_mgrpo.rollout.weight_broadcast import WeightBroadcaster

SGLANG_PYTHON = os.environ.get("MGRPO_SGLANG_PYTHON")
if not SGLANG_PYTHON and os.environ.get("CI"):
    raise RuntimeError("CI must provide SGLang's schema: "
                       "set MGRPO_SGLANG_PYTHON=$(bash tools/setup_sglang_schema.sh)")
pytestmark = pytest.mark.skipif(not SGLANG_PYTHON,
                                reason="set MGRPO_SGLANG_PYTHON=$(bash tools/setup_sglang_schema.sh)")

CHECKER = Path(__file__).parent / "sglang_schema.py"


def verdicts(requests):
    out = subprocess.run([SGLANG_PYTHON, str(CHECKER)], input=json.dumps(requests), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow
def test_every_payload_we_send_is_a_valid_sglang_request():
    named = [("model.norm.weight", torch.ones(4)), ("lm_head.weight", torch.zeros(2, 3, dtype=torch.bfloat16))]
    broadcaster = WeightBroadcaster("10.0.0.1", 29555, 3, backend="nccl", device="cpu")
    requests = [
        ("/generate", generate_payload([1, 2, 3], 4,
                                       SamplingParams(temperature=1.1, max_new_tokens=8, stop=("</s>",)))),
        ("/generate", generate_payload([1], 1, SamplingParams(top_k=20, top_p=0.9, seed=3), routed_experts=True)),
        ("/update_weights_from_disk", {"model_path": "/dev/shm/w", "weight_version": "3", "flush_cache": True}),
        ("/update_weights_from_tensor", tensor_update_payload(named, 2, 3, last=True)),
        ("/update_weights_from_distributed", distributed_update_payload(named, "mgrpo_weights", 3, last=False)),
        ("/init_weights_update_group", init_group_payload(broadcaster)),
        ("/release_memory_occupation", {"tags": ["weights", "kv_cache"]}),
        ("/resume_memory_occupation", {"tags": ["weights"]}),
    ]
    results = verdicts(requests)
    assert all(r["ok"] for r in results), [(route, r) for (route, _), r in zip(requests, results) if not r["ok"]]
    assert results[0]["seen"] == {"batch_size": 1, "parallel_sample_num": 4, "top_k": 1 << 30, "stop_strs": ["</s>"]}
    assert results[1]["seen"]["top_k"] == 20
    assert results[5]["seen"] == {"master_address": "10.0.0.1", "master_port": 29555, "rank_offset": 1,
                                  "world_size": 3, "group_name": "mgrpo_weights", "backend": "nccl"}


@pytest.mark.slow
def test_the_checker_rejects_what_sglang_rejects():
    requests = [("/generate", {"input_ids": [1], "sampling_params": {"max_tokens": 3}}),  # OpenAI's name
                ("/generate", {"input_ids": [1], "sampling_params": {"top_p": 0.0}}),
                ("/generate", {"input_ids": [1], "logprobs": True}),
                ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[2]],
                                                      "version": 3}),
                ("/init_weights_update_group", {"master_address": "h", "master_port": "x", "rank_offset": 1,
                                                "world_size": 2})]
    assert [r["ok"] for r in verdicts(requests)] == [False] * len(requests)
