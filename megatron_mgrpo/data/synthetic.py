"""Built-in synthetic tasks with gold answers, generated offline by reasoning-gym.

Fixed seeds give identical prompts in every process and run, which the embedded default and
the tests rely on. reasoning-gym builds item i from `Random(seed + i)`, so the streams of seeds s
and s + 1 are the same items shifted by one: seeds never separate data. Training, warm-start and
evaluation prompts come from `data.splits`, which separates them by question text.
"""

from __future__ import annotations

from collections.abc import Iterator

from megatron_mgrpo.data.records import DataError, PromptRecord

#: builtin task name -> (reasoning-gym dataset, its difficulty options)
TASKS = {
    "arithmetic": ("basic_arithmetic", {}),
    "chain_sum": ("chain_sum", {}),
    "gsm": ("gsm_symbolic", {}),
    # two terms of one or two digits: learnable by the embedded tiny model in minutes on a CPU
    "small_sums": ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}),
}


def synthetic_prompts(task: str, size: int, seed: int, **options) -> list[PromptRecord]:
    """The first `size` items of `task` (duplicates and all); `options` are reasoning-gym's
    difficulty knobs (e.g. max_terms)."""
    return list(synthetic_stream(task, seed, size, **options))


def synthetic_stream(task: str, seed: int, size: int, **options) -> Iterator[PromptRecord]:
    """The first `size` items of `task`, generated one by one (reasoning-gym builds each on demand,
    though some tasks set up per-item state for all `size` first)."""
    if task not in TASKS:
        raise DataError(f"unknown builtin task {task!r}: use builtin:{', builtin:'.join(TASKS)}")
    import reasoning_gym

    name, defaults = TASKS[task]
    try:
        dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **(defaults | options))
    except TypeError as err:
        raise DataError(f"builtin:{task} does not take options {sorted(options)}: {err}") from err
    for i in range(size):
        item = dataset[i]
        yield PromptRecord(id=f"{task}-{seed}-{i}", question=item["question"], gold_answer=str(item["answer"]))
