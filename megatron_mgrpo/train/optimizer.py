"""Megatron DDP, the distributed optimizer and the learning-rate schedule, from the config.

All three are megatron-core's own: DDP keeps gradients in contiguous fp32 buffers and reduces
them once per step; the distributed optimizer shards the fp32 main parameters and Adam states
over data-parallel ranks (ZeRO-1) and clips by the global gradient norm; the scheduler does
linear warm-up then cosine (or constant) decay. The loss is summed per micro-batch and
normalised by the global count of loss units (`calculate_per_token_loss`), so the gradient is the
same whatever the micro-batching and data-parallel split: the property the parallel-equivalence
tests check.
"""

from __future__ import annotations

import torch

from megatron_mgrpo.config import TrainConfig


def wrap_ddp(model: torch.nn.Module):
    """`model` (one pipeline stage) in megatron-core DDP with fp32 gradient buffers."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    config = model.config
    # the loss function returns (sum over loss units, number of units); megatron divides the
    # gradients by the global number of units after the data-parallel reduction
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    # every micro-batch is padded to its own longest sequence: pipeline stages exchange shapes first
    config.variable_seq_lengths = True
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                               overlap_grad_reduce=False, check_for_nan_in_grad=True)
    return DistributedDataParallel(config, ddp_config, model)


def build_optimizer(model_chunks: list, train: TrainConfig, params_dtype: torch.dtype):
    """(optimizer, scheduler) for DDP-wrapped `model_chunks`: AdamW + global-norm clip, warm-up + decay."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
                             adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, clip_grad=train.grad_clip,
                             bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
                             params_dtype=params_dtype, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(config, model_chunks)
    decay_steps = max(train.steps * train.updates_per_rollout, train.lr_warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.min_lr, lr_warmup_steps=train.lr_warmup_steps,
        lr_decay_steps=decay_steps, lr_decay_style=train.lr_schedule, start_wd=train.weight_decay,
        end_wd=train.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant")
    return optimizer, scheduler
