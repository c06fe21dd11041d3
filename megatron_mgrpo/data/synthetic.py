"""Built-in synthetic tasks with gold answers, generated offline by reasoning-gym.

Fixed seeds give identical prompts in every process and run, which the embedded default and
the tests rely on.
"""

from __future__ import annotations

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
    """`size` prompts of `task`; `options` are reasoning-gym's difficulty knobs (e.g. max_terms)."""
    if task not in TASKS:
        raise DataError(f"unknown builtin task {task!r}: use builtin:{', builtin:'.join(TASKS)}")
    import reasoning_gym

    name, defaults = TASKS[task]
    try:
        dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **(defaults | options))
    except TypeError as err:
        raise DataError(f"builtin:{task} does not take options {sorted(options)}: {err}") from err
    return [PromptRecord(id=f"{task}-{seed}-{i}", question=item["question"], gold_answer=str(item["answer"]))
            for i, item in enumerate(dataset)]
