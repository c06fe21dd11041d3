"""Two hooks on megatron-core's GPTModel for the rows the trainer feeds it (`train/batching.py`).

- Positions: megatron rotates the token at index t of a row by RoPE position t (`position_ids`
  only feed learned absolute embeddings). A row holding a prompt and then several responses to
  it needs each response positioned as if it followed the prompt alone, so the rotary table
  megatron computes for the row length, [S, 1, 1, d], is replaced by that table looked up at
  every token's position, [S, b, 1, d] (megatron's rotation broadcasts it over the heads as it
  did over the batch). Positions never exceed the row length, so the table covers them.
- Logits: only the positions that predict a response token need logits. The output layer gets
  just those hidden states, [n * R, 1, h] in the order of `MicroBatch.source`, so the model
  returns [1, n * R, V_local]: the LM head runs on the response positions only, and no logits
  of prompt positions are ever held (for a 150k vocabulary, the largest activation).

Both are set per micro-batch (`set`) right before its forward; under pipeline parallelism every
stage sets them for the micro-batch it runs, and the stages without the output layer skip it.
Unset (`clear`), the model runs as megatron built it.
"""

from __future__ import annotations

import torch


class RowHooks:
    def __init__(self, model: torch.nn.Module):
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        from megatron.core.models.gpt import GPTModel

        gpt = next(module for module in model.modules() if isinstance(module, GPTModel))
        if type(getattr(gpt, "rotary_pos_emb", None)) is not RotaryEmbedding:
            raise ValueError(f"the trainer's rows need a model with plain RoPE; this one has "
                             f"{type(getattr(gpt, 'rotary_pos_emb', None)).__name__}")
        self.positions: torch.Tensor | None = None  # [b, S]
        self.logit_index: torch.Tensor | None = None  # [n, R]: flat (row * S + position) indices
        gpt.rotary_pos_emb.register_forward_hook(self._at_positions)
        if getattr(gpt, "output_layer", None) is not None:  # the last pipeline stage
            gpt.output_layer.register_forward_pre_hook(self._only_response_positions)

    def set(self, positions: torch.Tensor, logit_index: torch.Tensor) -> None:
        self.positions, self.logit_index = positions, logit_index

    def clear(self) -> None:
        self.positions = self.logit_index = None

    def _at_positions(self, module, args, table: torch.Tensor) -> torch.Tensor | None:
        if self.positions is None:
            return None
        return table[:, 0, 0][self.positions.t().to(table.device)].unsqueeze(2)

    def _only_response_positions(self, module, args):
        if self.logit_index is None:
            return None
        hidden, *rest = args  # [S, b, h]
        picked = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])[self.logit_index.flatten().to(hidden.device)]
        return (picked[:, None], *rest)
