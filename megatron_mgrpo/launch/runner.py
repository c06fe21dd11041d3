"""Run the rendered steps: rollout servers first (all healthy), then the trainer, then clean up.

The batch script only traps Slurm's preemption warning and forwards it here; this process
forwards SIGUSR1 / SIGTERM to the trainer step (srun passes them on to every rank), waits for the
trainer to save and exit, and stops the servers, so the script can requeue the job.
"""

from __future__ import annotations

import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_mgrpo.launch.render import Step
from megatron_mgrpo.rollout.server import ServerProcess, ServerSpec

FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def run_steps(steps: list[Step], log_dir: str, startup_timeout_s: float = 1800.0) -> int:
    """Start every server step and wait until all are healthy, run the trainer steps; their exit code."""
    servers = [ServerProcess(ServerSpec(list(step.argv), step.engine.port, Path(log_dir) / f"{step.name}.launch.log",
                                        host=step.engine.host, startup_timeout_s=startup_timeout_s))
               for step in steps if step.engine]
    try:
        if servers:
            with ThreadPoolExecutor(len(servers)) as pool:
                list(pool.map(ServerProcess.start, servers))
        return _run_trainers([step for step in steps if not step.engine])
    finally:
        for server in servers:
            server.stop()


def _run_trainers(steps: list[Step]) -> int:
    procs = [subprocess.Popen(step.argv) for step in steps]

    def forward(signum, _frame):
        for proc in procs:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return next((code for code in codes if code), 0)
