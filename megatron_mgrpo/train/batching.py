"""Training sequences, their split over data-parallel ranks, rows and micro-batches.

A rollout batch is G responses to each of a few prompts. The model reads *rows*: one sequence
(prompt + response), or with prompt sharing one prompt followed by several of its responses,
each response attending to the prompt and to itself only and positioned as if it followed the
prompt alone. Every log-prob is then what the sequence alone would get, but the shared prompt's
tokens go through the model once per row instead of once per response: with short answers to
long (few-shot) prompts most of the compute. `share_prompt_rows` decides which responses share a
row by a cost model (linear layers grow with the row, attention with its square), so a row never
costs more than its sequences apart.

Rows are packed greedily in length order into micro-batches of at most `token_budget` padded
tokens, each padded to its widest row. Pipeline stages of one data-parallel rank build the same
rows and micro-batches, so they agree on their number and shapes.

Per-sequence tensors of a micro-batch are response-major: row i of `targets` holds the response
tokens of sequence `indices[i]`, and `source` the positions of the logits that predict them.
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

    def joined(self, other: TrainSequences) -> TrainSequences:
        """These sequences, then `other`'s (which has the same fields)."""
        return TrainSequences(self.tokens + other.tokens, self.prompt_lengths + other.prompt_lengths,
                              {k: [*v, *other.token_fields[k]] for k, v in self.token_fields.items()},
                              {k: [*v, *other.sequence_fields[k]] for k, v in self.sequence_fields.items()},
                              None if self.routing is None else self.routing + other.routing)


@dataclass
class MicroBatch:
    """One micro-batch: the model's input rows and the response tokens of the sequences in them."""

    indices: list[int]  # the sequences whose responses it holds, in response-row order
    input_ids: torch.Tensor  # [rows, S]
    position_ids: torch.Tensor  # [rows, S]: RoPE positions (a shared row restarts them after its prompt)
    attention_mask: torch.Tensor | None  # [rows, 1, S, S] bool, True = not attended; None: plain causal rows
    source: torch.Tensor  # [n, R]: flat index (row * S + position) of the logits predicting each response token
    targets: torch.Tensor  # [n, R]: the response tokens
    response_mask: torch.Tensor  # [n, R] bool: a real response token (not padding)
    fields: dict[str, torch.Tensor]  # token fields [n, R] (0 off the response), sequence fields [n]
    routing: list[torch.Tensor] | None = None  # per MoE layer, [S * rows, topk] expert ids in megatron's token order

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> MicroBatch:
        """The micro-batch on `device` (collated on the CPU; the model may live on a GPU)."""
        if self.input_ids.device == torch.device(device):
            return self

        def move(tensor):
            return None if tensor is None else tensor.to(device, non_blocking=True)

        return MicroBatch(self.indices, move(self.input_ids), move(self.position_ids), move(self.attention_mask),
                          move(self.source), move(self.targets), move(self.response_mask),
                          {name: move(value) for name, value in self.fields.items()},
                          None if self.routing is None else [move(layer) for layer in self.routing])


def data_parallel_share(num_sequences: int, dp_rank: int, dp_size: int) -> list[int]:
    """The sequence indices this data-parallel rank trains on: a strided share, so that every rank
    gets a similar mix of long and short sequences (and, a batch being prompt-major, responses of
    every prompt to share it among)."""
    return list(range(dp_rank, num_sequences, dp_size))


def share_prompt_rows(sequences: TrainSequences, token_budget: int, pair_cost: float | None) -> list[list[int]]:
    """Sequences grouped into rows; a row's sequences share its first one's prompt.

    `pair_cost` is the cost of one attended (query, key) pair relative to one token through the
    linear layers (`attention_pair_cost`); None puts every sequence in a row of its own. A
    response joins the current row of its prompt when that row stays within `token_budget` and
    costs no more than the response with its own copy of the prompt in a row apart. Sequences
    share a prompt when its tokens are equal and, with routing replay, so are its routed experts.
    """
    if pair_cost is None:
        return [[index] for index in range(len(sequences))]

    def cost(width: int) -> float:
        return width + pair_cost * width * width

    by_prompt: dict[tuple, list[int]] = {}
    for index, (tokens, prompt) in enumerate(zip(sequences.tokens, sequences.prompt_lengths)):
        key = (tuple(tokens[:prompt]),)
        if sequences.routing is not None:
            key += tuple(torch.as_tensor(layer[:prompt]).numpy().tobytes() for layer in sequences.routing[index])
        by_prompt.setdefault(key, []).append(index)
    rows = []
    for members in by_prompt.values():
        prompt = sequences.prompt_lengths[members[0]]
        row, width = [], 0
        for index in members:
            response = len(sequences.tokens[index]) - prompt
            fits = width + response <= token_budget
            if row and fits and cost(width + response) <= cost(width) + cost(prompt + response):
                row.append(index)
                width += response
            else:
                if row:
                    rows.append(row)
                row, width = [index], prompt + response
        rows.append(row)
    return rows


def attention_pair_cost(hidden_size: int, num_heads: int, head_dim: int, num_query_groups: int,
                        mlp_size: int) -> float:
    """FLOPs of one attended (query, key) pair over FLOPs of one token through a layer's linear
    layers (`mlp_size`: the intermediate size a token passes through, all active experts): a
    pair costs 2 multiply-adds per head dimension (q.k and p v), a token one per weight."""
    weights = hidden_size * head_dim * (2 * num_heads + 2 * num_query_groups) + 3 * hidden_size * mlp_size
    return 2 * num_heads * head_dim / weights


def row_width(sequences: TrainSequences, row: list[int]) -> int:
    prompt = sequences.prompt_lengths[row[0]]
    return prompt + sum(len(sequences.tokens[index]) - prompt for index in row)


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


def collate(sequences: TrainSequences, rows: list[list[int]], pad_id: int = 0, *, num_rows: int | None = None,
            width: int | None = None, routing_shape: tuple[int, int] | None = None) -> MicroBatch:
    """`rows` of `sequences` (see `share_prompt_rows`) as one right-padded micro-batch, by default
    of as many rows as given and as wide as the widest; `num_rows` / `width` pad further (rows
    past those given are all padding: no responses). `routing_shape` = (layers, topk) of the
    model, for the routing of rows without sequences."""
    num_rows = len(rows) if num_rows is None else num_rows
    width = max(row_width(sequences, row) for row in rows) if width is None else width
    members = [index for row in rows for index in row]
    row_tokens, row_positions, row_segments, sources, responses = [], [], [], [], []
    for r, row in enumerate(rows):
        prompt = sequences.prompt_lengths[row[0]]
        # segment 0: the prompt; k: the row's k-th response, positioned right after the prompt
        tokens, positions, segments = list(sequences.tokens[row[0]][:prompt]), list(range(prompt)), [0] * prompt
        for segment, index in enumerate(row, 1):
            response = sequences.tokens[index][prompt:]
            start = r * width + len(tokens)
            # the first response token is predicted at the prompt's last position, the others in-segment
            sources.append([r * width + prompt - 1] + list(range(start, start + len(response) - 1)))
            responses.append(response)
            tokens += response
            positions += range(prompt, prompt + len(response))
            segments += [segment] * len(response)
        row_tokens.append(tokens)
        row_positions.append(positions + list(range(len(positions), width)))
        row_segments.append(segments)
    padding_rows = [[]] * (num_rows - len(rows))
    input_ids = _padded(row_tokens + padding_rows, width, pad_id, torch.long)
    positions = _padded(row_positions + [list(range(width))] * len(padding_rows), width, 0, torch.long)
    segments = _padded(row_segments + padding_rows, width, -1, torch.long)
    longest = max(map(len, responses), default=1) or 1
    responses = responses or [[]]  # a micro-batch without sequences keeps one empty response row
    source = _padded(sources or [[]], longest, 0, torch.long)
    targets = _padded(responses, longest, 0, torch.long)
    response_mask = _padded([[True] * len(response) for response in responses], longest, False, torch.bool)
    fields = {name: _padded([_as_list(values[i]) for i in members] or [[]], longest, 0.0, torch.float32)
              for name, values in sequences.token_fields.items()}
    for name, values in sequences.sequence_fields.items():
        fields[name] = torch.tensor([float(values[i]) for i in members] or [0.0])
    routes = [_row_routing(sequences, row) for row in rows] if sequences.routing is not None else []
    attention_mask = None
    if any(len(row) > 1 for row in rows):
        query, key = segments[:, :, None], segments[:, None, :]
        allowed = torch.ones(width, width, dtype=torch.bool).tril() & ((key == 0) | (key == query))
        attention_mask = ~allowed[:, None]
    routing = None
    if sequences.routing is not None:
        from megatron_mgrpo.train.routing_replay import batch_routing

        layers, topk = routing_shape or (len(routes[0]), routes[0][0].shape[-1])
        routing = batch_routing(routes, width, topk, rows=num_rows, layers=layers)
    return MicroBatch(members, input_ids, positions, attention_mask, source, targets, response_mask, fields, routing)


def _padded(rows: list[list], length: int, fill, dtype: torch.dtype) -> torch.Tensor:
    """[len(rows), length]: each row's values, then `fill` (one tensor built from Python lists)."""
    return torch.tensor([row + [fill] * (length - len(row)) for row in rows], dtype=dtype)


def _as_list(values) -> list:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def _row_routing(sequences: TrainSequences, row: list[int]) -> list[torch.Tensor]:
    """Per layer, the routed experts of a row's tokens: the prompt's (equal for all the row's
    sequences), then each response's. A span the engine reported short (its last token is never
    fed back) gets experts 0..topk-1, as padding does: no logit read by the loss depends on it."""
    prompt = sequences.prompt_lengths[row[0]]

    def span(ids, start: int, end: int) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.int64)[start:end]
        filler = torch.arange(ids.shape[-1]).expand(end - start - ids.shape[0], -1)
        return torch.cat([ids, filler])

    return [torch.cat([span(per_sequence[0], 0, prompt)] + [
        span(ids, prompt, len(sequences.tokens[index])) for index, ids in zip(row, per_sequence)])
        for per_sequence in zip(*(sequences.routing[index] for index in row))]


def micro_batches(sequences: TrainSequences, token_budget: int, pad_id: int = 0,
                  pair_cost: float | None = None) -> list[MicroBatch]:
    """All of `sequences` as padded micro-batches of at most `token_budget` tokens each, their
    prompts shared within rows when `pair_cost` is given (`share_prompt_rows`)."""
    rows = share_prompt_rows(sequences, token_budget, pair_cost)
    groups = pack_by_tokens([row_width(sequences, row) for row in rows], token_budget)
    return [collate(sequences, [rows[i] for i in group], pad_id) for group in groups]
