"""A grouper that misbehaves the way sympy can on hostile input. Its own module, so that the
worker processes that import it stay quick to start."""

import os
import time

from megatron_mgrpo.reward.equivalence import AnswerGrader
from megatron_mgrpo.reward.symbolic import SymbolicGrouper


class FaultyGrouper(SymbolicGrouper):
    """Hangs on the answer `hang`, dies on `die`."""

    def merge(self, forms):
        if "hang" in forms:
            time.sleep(3600)
        if "die" in forms:
            os._exit(1)
        return super().merge(forms)


class FaultyGrader(AnswerGrader):
    grouper_type = FaultyGrouper
