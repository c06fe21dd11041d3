import dataclasses
import inspect

import pytest

from megatron_mgrpo.reward import AnswerGrader, PromptGroup, make_label_source, pseudo_label_accuracy
from megatron_mgrpo.reward.labels import SOURCES


@pytest.fixture(scope="module")
def grader():
    with AnswerGrader(num_workers=1, timeout_s=20.0) as g:
        yield g


def test_mgrpo_votes_with_momentum_but_rewards_only_the_policy(grader):
    group = PromptGroup("p", policy_answers=["1", "2", "2"], momentum_answers=["1", "1", "1.0"])
    mgrpo, = make_label_source("mgrpo", grader).label([group])
    assert mgrpo.label == "1" and mgrpo.share == pytest.approx(4 / 6) and mgrpo.rewards == [1.0, 0.0, 0.0]
    srt, = make_label_source("srt", grader).label([group])
    assert srt.label == "2" and srt.rewards == [0.0, 1.0, 1.0]


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


def test_gold_cannot_reach_label_free_rewards(grader):
    # 1. the only input of a label source has no place for gold
    assert {f.name for f in dataclasses.fields(PromptGroup)} == {"prompt_id", "policy_answers", "momentum_answers",
                                                                 "self_certainty"}
    # 2. label-free sources refuse gold at construction
    for name in set(SOURCES) - {"gt"}:
        with pytest.raises(ValueError, match="must never receive gold"):
            make_label_source(name, grader, gold={"p": "1"})
    # 3. nothing else can smuggle it in: every label-free source labels from groups alone
    for name in set(SOURCES) - {"gt"}:
        source = make_label_source(name, grader, ttrl_train_samples=2)
        assert list(inspect.signature(source.label).parameters) == ["groups"]
        assert not any("gold" in attr for attr in vars(source))
    # 4. the monitoring metric is where gold goes, and it reflects the truth
    groups = [PromptGroup("p", ["1", "1", "2"], ["1"]), PromptGroup("q", ["7", "7", "8"], ["7"])]
    results = make_label_source("mgrpo", grader).label(groups)
    assert pseudo_label_accuracy(results, ["p", "q"], {"p": "1.0", "q": "8"}, grader) == 0.5
    assert [r.rewards for r in results] == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]


def test_unknown_source(grader):
    with pytest.raises(ValueError, match="reward.label_source='vote'"):
        make_label_source("vote", grader)
