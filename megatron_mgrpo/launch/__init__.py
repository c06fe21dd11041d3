"""Cluster launch: validate a run's layout and memory, derive ranks and hosts from Slurm, render and run
the srun / torchrun and rollout-server commands (`mgrpo launch`).

Kept free of heavy imports so the CLI can catch `LaunchError` without loading torch.
"""


class LaunchError(ValueError):
    """A layout or allocation that cannot run; the message names the constraint, the values and the fix."""
