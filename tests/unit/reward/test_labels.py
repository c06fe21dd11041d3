import dataclasses
import inspect
from collections.abc import Mapping

import pytest

from megatron_mgrpo.config import LABEL_SOURCES
from megatron_mgrpo.reward import PromptGroup, make_label_source, pseudo_label_accuracy


def test_mgrpo_votes_with_momentum_but_rewards_only_the_policy(grader):
    group = PromptGroup("p", policy_answers=["1", "2", "2"], momentum_answers=["1", "1", "1.0"])
    mgrpo, = make_label_source("mgrpo", grader).label([group])
    assert mgrpo.label == "1" and mgrpo.share == pytest.approx(4 / 6) and mgrpo.rewards == [1.0, 0.0, 0.0]
    srt, = make_label_source("srt", grader).label([group])
    assert srt.label == "2" and srt.rewards == [0.0, 1.0, 1.0]


def test_mgrpo_can_take_its_label_from_the_momentum_votes_alone(grader):
    """vote_pool=momentum: the policy's 4 votes for "2" cannot outvote the momentum model's "1"."""
    group = PromptGroup("p", policy_answers=["2", "2", "2", "2", "1"], momentum_answers=["1", "1.0", "3"])
    pool, = make_label_source("mgrpo", grader).label([group])
    assert pool.label == "2" and pool.rewards == [1.0, 1.0, 1.0, 1.0, 0.0]
    alone, = make_label_source("mgrpo", grader, vote_pool="momentum").label([group])
    assert alone.label == "1" and alone.share == pytest.approx(2 / 3) and alone.rewards == [0.0] * 4 + [1.0]
    unvoted, = make_label_source("mgrpo", grader, vote_pool="momentum").label(
        [PromptGroup("q", ["2", "2"], [None, None])])
    assert not unvoted.trained and unvoted.rewards == [0.0, 0.0]
    with pytest.raises(ValueError, match="reward.vote_pool='both'"):
        make_label_source("mgrpo", grader, vote_pool="both")


def test_ttrl_rewards_a_subset(grader):
    result, = make_label_source("ttrl", grader, ttrl_train_samples=2).label(
        [PromptGroup("p", policy_answers=["5", "6", "6", "6"])])
    assert result.label == "6" and result.rewards == [0.0, 1.0]
    with pytest.raises(ValueError, match="raise rollout.group_size"):
        make_label_source("ttrl", grader, ttrl_train_samples=9).label([PromptGroup("p", ["1"])])


def test_gold_and_intuitor(grader):
    gt = make_label_source("gt", grader, gold={"a": "0.5"})
    result, = gt.label([PromptGroup("a", policy_answers=[r"\frac{1}{2}", "2", None])])
    assert result.rewards == [1.0, 0.0, 0.0] and result.trained
    with pytest.raises(ValueError, match="prompt 'b' has no gold answer"):
        gt.label([PromptGroup("b", ["1"])])
    intuitor, = make_label_source("intuitor", grader).label([PromptGroup("a", [None, None], self_certainty=[0.3, 0.1])])
    assert intuitor.rewards == [0.3, 0.1] and intuitor.label is None


def test_below_threshold_means_no_gradient(grader):
    result, = make_label_source("srt", grader, threshold=0.75).label([PromptGroup("p", ["1", "2", "1", "3"])])
    assert not result.trained and result.label is None and result.rewards == [0.0] * 4


class PoisonedGold(Mapping):
    """Gold answers that fail the test the moment anything reads them."""

    def __getitem__(self, prompt_id):
        raise AssertionError(f"gold answer of {prompt_id!r} was read")

    def __iter__(self):
        raise AssertionError("gold answers were iterated")

    def __len__(self):
        raise AssertionError("gold answers were counted")


GROUPS = [PromptGroup("p", ["1", "1", "2", None], ["1", "2"], self_certainty=[0.1, 0.2, 0.3, 0.4]),
          PromptGroup("q", ["7", "8", "8", "7.0"], ["7", "7"], self_certainty=[0.5, 0.6, 0.7, 0.8])]
LABEL_FREE = sorted(set(LABEL_SOURCES) - {"gt"})


@pytest.mark.parametrize("name", LABEL_FREE)
def test_label_free_sources_refuse_gold_without_reading_it(grader, name):
    with pytest.raises(ValueError, match=f"reward.label_source={name} is label-free and must never receive gold"):
        make_label_source(name, grader, gold=PoisonedGold())


def test_the_poison_works_on_the_source_that_reads_gold(grader):
    with pytest.raises(AssertionError, match="gold answer of 'p' was read"):
        make_label_source("gt", grader, gold=PoisonedGold()).label(GROUPS)


@pytest.mark.parametrize("name", LABEL_FREE)
def test_gold_cannot_reach_label_free_rewards(grader, name):
    # the only input of a label source has no place for gold, and nothing else can smuggle it in
    assert {f.name for f in dataclasses.fields(PromptGroup)} == {"prompt_id", "policy_answers", "momentum_answers",
                                                                 "self_certainty"}
    source = make_label_source(name, grader, ttrl_train_samples=3)
    assert list(inspect.signature(source.label).parameters) == ["groups"]
    before = source.label(GROUPS)
    # gold flows through the shared grader for monitoring, right and wrong: rewards do not move
    right, wrong = {"p": "1", "q": "7"}, {"p": "2", "q": "8"}
    if name != "intuitor":
        assert pseudo_label_accuracy(before, ["p", "q"], right, grader) == 1.0
        assert pseudo_label_accuracy(before, ["p", "q"], wrong, grader) == 0.0
    after = source.label(GROUPS)
    assert [(r.label, r.share, r.rewards, r.trained) for r in after] == \
        [(r.label, r.share, r.rewards, r.trained) for r in before]
    if name != "intuitor":  # the pseudo-labels, not gold, decided the rewards
        wrong_gold_rewards = make_label_source("gt", grader, gold=wrong).label(GROUPS)
        assert [r.rewards for r in after] != [r.rewards[:len(a.rewards)] for r, a in zip(wrong_gold_rewards, after)]


def test_monitoring_counts_only_labelled_prompts(grader):
    results = make_label_source("srt", grader, threshold=0.9).label(GROUPS)
    assert all(r.label is None for r in results)
    assert pseudo_label_accuracy(results, ["p", "q"], {"p": "1", "q": "7"}, grader) is None


def test_unknown_source(grader):
    with pytest.raises(ValueError, match="reward.label_source='vote'"):
        make_label_source("vote", grader)
    with pytest.raises(ValueError, match="reward.label_source=gt needs gold answers"):
        make_label_source("gt", grader)


def test_intuitor_needs_one_score_per_response(grader):
    with pytest.raises(ValueError, match="prompt 'p': reward.label_source=intuitor needs one self-certainty"):
        make_label_source("intuitor", grader).label([PromptGroup("p", ["1", "2"], self_certainty=[0.5])])
