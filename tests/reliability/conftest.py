"""Fixtures shared by the reliability tests."""

from __future__ import annotations

import logging

import pytest

from ._trials import S3Server


@pytest.fixture(scope="module")
def server():
    """moto S3 on 127.0.0.1 behind a proxy that can cut every connection (see ``S3Server``)."""
    pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = S3Server()
    yield srv
    srv.stop()
