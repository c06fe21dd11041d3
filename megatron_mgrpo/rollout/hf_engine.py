"""In-process rollout engine over a transformers causal LM (the embedded CPU default).

It runs its own decode loop on transformers' KV cache instead of `model.generate`, because
`generate` can only return sampled-token log-probs by keeping the full [batch, steps, vocab]
logits; here only the log-prob of each sampled token is kept. Each prompt is prefilled once and
its cache fanned out to the n samples; finished rows leave the batch, so long and short
responses do not pay for each other.

With `routed_experts=True` (MoE models, for routing replay in training) every forward also
returns the router logits, and the top-k experts of each position the model saw (the prompt, and
each sampled token but the last, which is never fed back) become `Sample.routed_experts`: the
same layout SGLang reports.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_mgrpo.rollout.types import Sample, SamplingParams


def sample_next_tokens(logits: torch.Tensor, sampling: SamplingParams,
                       noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of `logits` [rows, vocab], given Exp(1) `noise` of the same shape.

    argmax(log p - log E) with E ~ Exp(1) is an exact draw from p (the exponential race). Taking
    the noise as an input lets the caller draw it for every row of the batch, finished or not,
    so a sample never depends on when its neighbours stopped.

    Returns (tokens, logprobs): the log-prob of each token under the distribution it was drawn
    from (temperature, then top-k / top-p, renormalised).
    """
    logprobs = torch.log_softmax(logits.float() / sampling.temperature, dim=-1)
    filtered = logprobs
    if sampling.top_k > 0 and sampling.top_k < logprobs.shape[-1]:
        kth = logprobs.topk(sampling.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_lp, order = filtered.sort(dim=-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(dim=-1) - sorted_lp.exp()
        drop_sorted = mass_before >= sampling.top_p  # the most likely token always survives
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    tokens = (filtered - noise.log()).argmax(dim=-1)
    filtered = filtered - filtered.logsumexp(dim=-1, keepdim=True)
    return tokens, filtered.gather(-1, tokens[:, None]).squeeze(-1)


class HFEngine:
    """A `RolloutEngine` that samples with a transformers model in this process."""

    in_process = True

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch_size: int = 256, seed: int = 0,
                 routed_experts: bool = False):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.topk = getattr(model.config, "num_experts_per_tok", None) if routed_experts else None
        if routed_experts and not self.topk:
            raise ValueError(f"routed_experts=True needs an MoE model; {type(model).__name__} has no "
                             f"num_experts_per_tok: turn routing replay off for dense models")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.weights_version = 0
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = torch.tensor(sorted({eos} if isinstance(eos, int) else set(eos or ())), device=self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(self.eos_ids[0])

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        **kwargs) -> HFEngine:
        from transformers import AutoTokenizer

        from megatron_mgrpo.models.loading import load_hf_model

        return cls(load_hf_model(path, dtype).to(device), AutoTokenizer.from_pretrained(path), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[Sample]:
        if n < 1:
            raise ValueError(f"n={n} samples per prompt must be >= 1")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token; got an empty prompt")
        generator = self._generator
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        per_chunk = max(1, self.max_batch_size // n)
        samples: list[Sample] = []
        for start in range(0, len(prompts), per_chunk):
            samples += self._generate_chunk(prompts[start:start + per_chunk], start, n, sampling, generator)
        return samples

    def _generate_chunk(self, prompts, first_index, n, sampling, generator) -> list[Sample]:
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=self.device)
        attention = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left padding keeps every last prompt token aligned
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, device=self.device)
            attention[row, width - len(prompt):] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)

        cache = DynamicCache(config=self.model.config)
        routing = self.topk is not None
        out = self._forward(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                            past_key_values=cache)
        logits = out.logits[:, -1].repeat_interleave(n, dim=0)
        if routing:  # per sample row and layer: the experts of every position fed so far, the prompt's first
            prompt_experts = [self._experts(r).view(len(prompts), width, -1) for r in out.router_logits]
            routes = [[[layer[row // n, width - len(prompts[row // n]):]] for layer in prompt_experts]
                      for row in range(len(prompts) * n)]
        cache.batch_repeat_interleave(n)
        attention = attention.repeat_interleave(n, dim=0)
        next_position = positions[:, -1:].repeat_interleave(n, dim=0) + 1

        rows = len(prompts) * n
        tokens = torch.full((rows, sampling.max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        logprobs = torch.zeros((rows, sampling.max_new_tokens), device=self.device)
        lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        finish = ["length"] * rows
        active = torch.arange(rows, device=self.device)  # which original rows are still decoding
        for step in range(sampling.max_new_tokens):
            noise = torch.empty(rows, logits.shape[-1], device=self.device).exponential_(generator=generator)
            token, logprob = sample_next_tokens(logits, sampling, noise[active])
            tokens[active, step] = token
            logprobs[active, step] = logprob
            lengths[active] = step + 1
            done = torch.isin(token, self.eos_ids)
            if sampling.stop:
                done |= self._hit_stop_string(tokens, active, step + 1, sampling.stop)
            for row in active[done].tolist():
                finish[row] = "stop"
            keep = (~done).nonzero().squeeze(-1)
            if keep.numel() == 0 or step + 1 == sampling.max_new_tokens:
                break
            if keep.numel() < active.numel():
                cache.batch_select_indices(keep)
                active, token, attention = active[keep], token[keep], attention[keep]
                next_position = next_position[keep]
            attention = torch.cat([attention, attention.new_ones(len(active), 1)], dim=1)
            out = self._forward(input_ids=token[:, None], attention_mask=attention, position_ids=next_position,
                                past_key_values=cache)
            logits = out.logits[:, -1]
            next_position = next_position + 1
            if routing:
                fed = [self._experts(r) for r in out.router_logits]
                for i, row in enumerate(active.tolist()):
                    for layer, experts in enumerate(fed):
                        routes[row][layer].append(experts[i:i + 1])

        samples = []
        for row in range(rows):
            response = tokens[row, :lengths[row]].tolist()
            samples.append(Sample(
                prompt_index=first_index + row // n, prompt_ids=list(prompts[row // n]), response_ids=response,
                text=self.tokenizer.decode(response, skip_special_tokens=True),
                logprobs=logprobs[row, :lengths[row]].tolist(), finish_reason=finish[row],
                weights_version=self.weights_version,
                routed_experts=[torch.cat(parts).to(torch.int32) for parts in routes[row]] if routing else None))
        return samples

    def _forward(self, **inputs):
        """Logits of the last position (and, recording routing, every layer's router logits).

        With routing, the decoder and the LM head are called separately: the causal-LM forward
        also computes its load-balancing loss from the router logits, which breaks on a KV cache
        with padding, and the loss is of no use here."""
        if self.topk is None:
            return self.model(**inputs, use_cache=True, logits_to_keep=1)
        out = self.model.get_decoder()(**inputs, use_cache=True, output_router_logits=True)
        out.logits = self.model.get_output_embeddings()(out.last_hidden_state[:, -1:])
        return out

    def _experts(self, router_logits: torch.Tensor) -> torch.Tensor:
        """The top-k experts per position: HF's routers take the top-k of softmax(logits), which
        are the top-k logits."""
        return router_logits.topk(self.topk, dim=-1).indices

    def _hit_stop_string(self, tokens: torch.Tensor, active: torch.Tensor, length: int,
                         stop: tuple[str, ...]) -> torch.Tensor:
        """Whether each active row's text now ends inside a stop string.

        Only a tail window is decoded: a stop string of c characters spans at most c tokens, and a
        few more cover tokens that decode to partial characters.
        """
        window = max(len(s) for s in stop) + 4
        hits = []
        for row in active.tolist():
            tail = self.tokenizer.decode(tokens[row, max(0, length - window):length].tolist(),
                                         skip_special_tokens=True)
            hits.append(any(s in tail for s in stop))
        return torch.tensor(hits, device=self.device)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy HF-named tensors (checkpoint names, as exports write them) into the model in place:
        no reallocation, no module rebuild."""
        from megatron_mgrpo.models.weight_map import checkpoint_tensors

        params = checkpoint_tensors(self.model)
        for name, tensor in named_tensors:
            target = params.get(name)
            if target is None:
                close = difflib.get_close_matches(name, list(params), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise KeyError(f"weight update names {name!r}, which this model does not have{hint}")
            if target.shape != tensor.shape:
                raise ValueError(f"weight update for {name!r} has shape {tuple(tensor.shape)}, the model "
                                 f"expects {tuple(target.shape)}: the exporter and engine disagree on layout")
            target.copy_(tensor)
        self.weights_version = version

    def health(self) -> dict[str, Any]:
        if self.model is None:
            raise RuntimeError("the in-process engine was shut down")
        return {"engine": "hf", "device": str(self.device), "weights_version": self.weights_version}

    def shutdown(self) -> None:
        self.model = None
