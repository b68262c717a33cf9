"""SIGKILL of a saving rank at random points (a named failpoint, or a timer anywhere in a stream
of saves with retention): no committed step is ever corrupt, no acknowledged step is lost, the
default load returns the newest committed step, and a new job saves into the same root.

The default run does two trials; ``-m slow`` ten; ``scripts/reliability.py`` fifty."""

from __future__ import annotations

import pytest

from ._trials import kill_trial


def _check(outcome):
    assert outcome.injected, outcome.note
    assert outcome.lost == 0, outcome.note
    assert outcome.detected and outcome.recovered, outcome.note


@pytest.mark.parametrize("seed", [4, 7])  # save.index on a random save; a timer
def test_sigkill_trial(run_ranks, tmp_path, seed):
    _check(kill_trial(seed, tmp_path, run_ranks))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 110))
def test_sigkill_trials(run_ranks, tmp_path, seed):
    _check(kill_trial(seed, tmp_path, run_ranks))
