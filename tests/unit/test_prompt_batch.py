"""PromptBatch: which prompts teach something, and selecting / joining prompts keeps every row with
its prompt (dynamic sampling)."""

import torch

from megatron_mgrpo.prompt_batch import PromptBatch, Rewards
from megatron_mgrpo.train.batching import TrainSequences
from megatron_mgrpo.train.policy import Scores

M, G = 3, 4  # 3 policy responses and 1 momentum response per prompt


def batch(rewards, trainable=None, confident=None, first=0):
    """A batch whose prompt p's rows hold token 100 * (first + p) + row, so rows can be traced."""
    rewards = torch.tensor(rewards, dtype=torch.float32)
    prompts = len(rewards)
    tokens = [[100 * (first + p) + r, 1] for p in range(prompts) for r in range(G)]
    sequences = TrainSequences(tokens, [1] * len(tokens), {"rollout_logp": [[float(t[0])] for t in tokens]})
    scores = Scores([torch.tensor([float(t[0])]) for t in tokens], [torch.tensor([0.5]) for _ in tokens],
                    [float(t[0]) for t in tokens])
    trainable = torch.ones(prompts, M, dtype=torch.bool) if trainable is None else torch.tensor(trainable).bool()
    confident = torch.ones(prompts, M, dtype=torch.bool) if confident is None else torch.tensor(confident).bool()
    graded = Rewards(rewards, trainable, torch.full((prompts, M), float("nan")), {"reward/mean": 0.5}, 10 * prompts)
    return PromptBatch(list(range(first, first + prompts)), sequences, scores, graded, confident, G)


def test_informative_prompts_are_those_whose_kept_rewards_differ():
    b = batch([[1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 0, 1], [1, 0, 0], [0, 1, 0]],
              trainable=[[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1]],
              confident=[[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    # 0 differs; 1, 2 unanimous; 3 unlabelled; 4 one response left by the filter; 5 two left, 0 and 1
    assert b.informative() == [0, 5]


def test_select_and_join_keep_every_row_with_its_prompt():
    a, b = batch([[1, 0, 0], [1, 1, 1]]), batch([[0, 1, 0]], first=7)
    picked = a.select([1]).joined(b).joined(a.select([0]))
    assert picked.prompts == [1, 7, 0]
    owners = [t[0] // 100 for t in picked.sequences.tokens]
    assert owners == [1] * G + [7] * G + [0] * G
    assert [int(x) for x in picked.scores.self_certainty] == [t[0] for t in picked.sequences.tokens]
    assert [int(lp) for lp in torch.cat(picked.scores.logprobs)] == [t[0] for t in picked.sequences.tokens]
    assert picked.graded.rewards.tolist() == [[1, 1, 1], [0, 1, 0], [1, 0, 0]]
    assert picked.graded.metrics == {"reward/mean": 0.5}  # the step's own batch's label metrics
    assert a.select([1]).joined(b).graded.generated_tokens == 20 + 10  # what each drawn batch generated
    assert picked.informative() == [1, 2]
