import pytest

from megatron_mgrpo.reward import AnswerGrader


@pytest.fixture(scope="session")
def grader():
    """One worker for the whole package: starting a process (sympy import) is the slow part."""
    with AnswerGrader(num_workers=1, timeout_s=30.0) as g:
        yield g
