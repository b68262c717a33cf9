"""The S3 server (moto on 127.0.0.1, behind a proxy that resets every connection) stopped and
restarted while a save or a load reaches one of its files: retried, then either success or a
clear error naming the file; never a committed partial checkpoint, never lost data."""

from __future__ import annotations

import pytest

from ._trials import s3_outage_trial


def _check(outcome, *, error):
    assert outcome.injected and outcome.detected and outcome.recovered, outcome.note
    assert outcome.lost == 0, outcome.note
    if error is not None:
        assert outcome.error == error, outcome.note


@pytest.mark.parametrize("phase", ["save", "load"])
def test_short_outage(server, phase):
    _check(s3_outage_trial(server, 2, phase=phase), error=None)


@pytest.mark.parametrize("phase", ["save", "load"])
def test_outage_past_the_retries(server, phase):
    """The server stays down until the operation gives up: a clear error, nothing committed."""
    outcome = s3_outage_trial(server, 3, phase=phase, until_done=True)
    _check(outcome, error=True)
    assert "failed after 5 attempts" in outcome.note, outcome.note


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["save", "load"])
@pytest.mark.parametrize("seed", range(100, 106))
def test_outages(server, phase, seed):
    _check(s3_outage_trial(server, seed, phase=phase), error=None)
