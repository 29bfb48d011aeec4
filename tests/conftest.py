"""Session-wide test hooks: the coverage sweeps print what they found; tiny models can run on one thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread: tiny models spend more time synchronising two threads than computing,
    and far more on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests import sweep

    for name, results in sorted(sweep.RESULTS.items()):
        outcomes: dict[str, list[str]] = {}
        for model_type, (outcome, _) in sorted(results.items()):
            outcomes.setdefault(outcome, []).append(model_type)
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(outcomes.items()))
        terminalreporter.write_sep("-", f"{name} sweep coverage: {counts} of {len(results)} model types")
        for model_type, (outcome, detail) in sorted(results.items()):
            if outcome != "pass":
                terminalreporter.write_line(f"{outcome:10s} {model_type}: {detail}")
