"""The third-party warnings and log lines a run prints that say nothing to our users, silenced in
one place. Each entry is a message we have seen repeated in every phase of a CPU or GPU run and
checked to be harmless for this project; anything else, our own warnings included, still shows."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

#: (category, start of the message) of warnings this project's users cannot act on
KNOWN_WARNINGS = [
    # megatron-core on machines without Transformer Engine / Apex (every CPU run): its fallbacks are
    # what the CPU path uses; a GPU run that needs Transformer Engine says so itself
    (UserWarning, "Transformer Engine and Apex are not installed"),
    (UserWarning, "Apex is not installed"),
    (UserWarning, "full scope is deprecated"),  # megatron's own default cuda_graph_scope
    (UserWarning, "When using async grad allreduce it is recommended to set the environment variable "
                  "CUDA_DEVICE_MAX_CONNECTIONS"),
    # megatron's optimizer looking for main_grad on every parameter
    (UserWarning, "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
    (FutureWarning, "`past_key_values` is deprecated"),  # transformers' generate calling its own model
    # megatron-core's distributed optimizer calling collectives torch 2.13 renamed
    (FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated"),
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"),
    (UserWarning, "Setuptools is replacing distutils"),
]

#: loggers whose INFO / WARNING lines are megatron's or transformers' bookkeeping
KNOWN_LOGGERS = ["megatron.core.rerun_state_machine", "megatron.core.utils",
                 "megatron.core.num_microbatches_calculator"]


def quiet_third_party() -> None:
    """Filter the known warnings and log lines, and transformers' per-load progress bars and
    weight tables (our loader checks the weights itself: models/loading.py). The two settings of
    transformers go through its environment variables, so that importing it is not the price of
    `mgrpo config show`, and processes started from this one inherit them; a user's own setting
    of either wins."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    for name in KNOWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported before us: its settings were read already
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
