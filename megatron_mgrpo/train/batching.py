"""Training sequences, their split over data-parallel ranks, and micro-batches under a token budget.

A rollout batch is a list of (prompt + response) token sequences of very different lengths. Each
micro-batch is padded to its own longest sequence, so sequences are packed greedily in length
order into micro-batches of at most `token_budget` padded tokens: similar lengths share a
micro-batch and little compute goes to padding. Pipeline stages of one data-parallel rank pack
the same sequences the same way, so they agree on the number and shapes of micro-batches.

Per-token fields are aligned with the *targets*: position t of a [b, S - 1] field belongs to
token t + 1 of the sequence, predicted from the logits at position t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class TrainSequences:
    """Sequences to score or train on.

    `token_fields` hold one value per response token of each sequence (e.g. the engine's
    log-probs); `sequence_fields` one value per sequence (e.g. the advantage). `routing` (MoE
    routing replay) holds each sequence's expert choices as the engine reports them
    (`Sample.routed_experts`: per layer, [positions, topk] ids from the first token on).
    """

    tokens: list[list[int]]
    prompt_lengths: list[int]
    token_fields: dict[str, list[Sequence[float]]] = field(default_factory=dict)
    sequence_fields: dict[str, Sequence[float]] = field(default_factory=dict)
    routing: list[list[torch.Tensor]] | None = None

    def __post_init__(self):
        if len(self.tokens) != len(self.prompt_lengths):
            raise ValueError(f"{len(self.tokens)} sequences but {len(self.prompt_lengths)} prompt lengths")
        for index, (tokens, prompt) in enumerate(zip(self.tokens, self.prompt_lengths)):
            if not 1 <= prompt <= len(tokens):
                raise ValueError(f"sequence {index}: prompt length {prompt} is outside 1..{len(tokens)} tokens")
        for name, values in self.token_fields.items():
            for index, (row, tokens, prompt) in enumerate(zip(values, self.tokens, self.prompt_lengths)):
                if len(row) != len(tokens) - prompt:
                    raise ValueError(f"token field {name!r}, sequence {index}: {len(row)} values for "
                                     f"{len(tokens) - prompt} response tokens")
        for name, values in self.sequence_fields.items():
            if len(values) != len(self.tokens):
                raise ValueError(f"sequence field {name!r} has {len(values)} values for {len(self.tokens)} sequences")
        if self.routing is not None:
            if len(self.routing) != len(self.tokens):
                raise ValueError(f"routing of {len(self.routing)} sequences for {len(self.tokens)} sequences")
            missing = [index for index, routed in enumerate(self.routing) if routed is None]
            if missing:
                raise ValueError(f"sequences {missing[:8]} have no routed experts: for routing replay the rollout "
                                 f"engine must report them (Sample.routed_experts)")

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, indices: Sequence[int]) -> TrainSequences:
        return TrainSequences([self.tokens[i] for i in indices], [self.prompt_lengths[i] for i in indices],
                              {k: [v[i] for i in indices] for k, v in self.token_fields.items()},
                              {k: [v[i] for i in indices] for k, v in self.sequence_fields.items()},
                              None if self.routing is None else [self.routing[i] for i in indices])


@dataclass
class MicroBatch:
    """One padded micro-batch: `indices` into the sequences it was built from."""

    indices: list[int]
    input_ids: torch.Tensor  # [b, S]
    position_ids: torch.Tensor  # [b, S]
    targets: torch.Tensor  # [b, S - 1]: input_ids shifted left
    response_mask: torch.Tensor  # [b, S - 1] bool: the target is a response token
    fields: dict[str, torch.Tensor]  # token fields [b, S - 1] (0 off the response), sequence fields [b]
    routing: list[torch.Tensor] | None = None  # per MoE layer, [S * b, topk] expert ids in megatron's token order

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def data_parallel_share(num_sequences: int, dp_rank: int, dp_size: int) -> list[int]:
    """The sequence indices this data-parallel rank trains on: a strided share, so that every rank
    gets a similar mix of long and short sequences."""
    return list(range(dp_rank, num_sequences, dp_size))


def pack_by_tokens(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group indices so that each group's (size x longest length) stays within `token_budget`.

    Longest first, so the padded width of a group is set by its first member; a sequence longer
    than the budget gets a micro-batch of its own rather than an error (it still has to train).
    """
    if token_budget < 1:
        raise ValueError(f"train.micro_batch_tokens={token_budget} must be >= 1")
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= token_budget:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def collate(sequences: TrainSequences, indices: list[int], pad_id: int = 0, *, rows: int | None = None,
            width: int | None = None, routing_shape: tuple[int, int] | None = None) -> MicroBatch:
    """Pad `indices` of `sequences` into one micro-batch (right padding), by default as many rows
    as sequences and as wide as the longest; `rows` / `width` pad further (rows past the
    sequences are all padding: no response tokens). `routing_shape` = (layers, topk) of the
    model, for the routing of rows without sequences."""
    rows = len(indices) if rows is None else rows
    width = max(len(sequences.tokens[i]) for i in indices) if width is None else width
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    response_mask = torch.zeros(rows, width - 1, dtype=torch.bool)
    fields = {name: torch.zeros(rows, width - 1) for name in sequences.token_fields}
    for row, index in enumerate(indices):
        tokens, prompt = sequences.tokens[index], sequences.prompt_lengths[index]
        input_ids[row, :len(tokens)] = torch.tensor(tokens)
        response = slice(prompt - 1, len(tokens) - 1)
        response_mask[row, response] = True
        for name, values in sequences.token_fields.items():
            fields[name][row, response] = torch.as_tensor(values[index], dtype=torch.float32)
    for name, values in sequences.sequence_fields.items():
        fields[name] = torch.zeros(rows)
        fields[name][:len(indices)] = torch.tensor([float(values[i]) for i in indices])
    positions = torch.arange(width)[None].expand(rows, width)
    routing = None
    if sequences.routing is not None:
        from megatron_mgrpo.train.routing_replay import batch_routing

        routed = [sequences.routing[i] for i in indices]
        layers, topk = routing_shape or (len(routed[0]), routed[0][0].shape[-1])
        routing = batch_routing(routed, width, topk, rows=rows, layers=layers)
    return MicroBatch(indices, input_ids, positions, input_ids[:, 1:], response_mask, fields, routing)


def micro_batches(sequences: TrainSequences, token_budget: int, pad_id: int = 0) -> list[MicroBatch]:
    """All of `sequences` as padded micro-batches of at most `token_budget` tokens each."""
    groups = pack_by_tokens([len(tokens) for tokens in sequences.tokens], token_budget)
    return [collate(sequences, group, pad_id) for group in groups]
