"""``ucp.testing.scaled_timeout``: slow tests' subprocess timeouts grow with the machine's load."""

from __future__ import annotations

import pytest

import ucp.testing as testing


@pytest.fixture
def fresh_scale(monkeypatch):
    """Forget the process's measured factor for this test (and restore it after)."""
    monkeypatch.setattr(testing, "_scale", None)
    monkeypatch.delenv("UCP_TEST_TIMEOUT_SCALE", raising=False)


def test_the_environment_sets_the_factor(fresh_scale, monkeypatch):
    monkeypatch.setenv("UCP_TEST_TIMEOUT_SCALE", "4")
    assert testing.scaled_timeout(300) == 1200.0
    monkeypatch.setattr(testing, "_scale", None)
    monkeypatch.setenv("UCP_TEST_TIMEOUT_SCALE", "0.5")  # never shorter than the quiet budget
    assert testing.scaled_timeout(300) == 300.0


def test_a_factor_that_is_no_number_says_what_to_set(fresh_scale, monkeypatch):
    monkeypatch.setenv("UCP_TEST_TIMEOUT_SCALE", "fast")
    with pytest.raises(ValueError, match=r"UCP_TEST_TIMEOUT_SCALE='fast' is not a number"):
        testing.timeout_scale()


def test_the_factor_is_measured_once_and_bounded(fresh_scale, monkeypatch):
    # a reference machine a million times faster than this one: the factor stops at the cap
    monkeypatch.setattr(testing, "_REFERENCE_TORCH_IMPORT_S", 1e-6)
    assert testing.timeout_scale() == testing._MAX_SCALE == 8.0
    monkeypatch.setattr(testing, "_REFERENCE_TORCH_IMPORT_S", 1e6)
    assert testing.timeout_scale() == 8.0  # measured once per process, not again
    monkeypatch.setattr(testing, "_scale", None)
    monkeypatch.setattr(testing.subprocess, "run", lambda *a, **k: None)  # an instant import
    assert testing.timeout_scale() == 1.0  # never below 1
