"""Shared fixtures: a real S3-compatible server (moto) on 127.0.0.1 for the whole session."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from ucp.testing import subprocess_env

# Every process of the suite (ranks, torchrun, DeepSpeed tools) builds DeepSpeed's ops inside the
# virtual environment, never under the user's shared ~/.cache/torch_extensions (see subprocess_env).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", subprocess_env()["TORCH_EXTENSIONS_DIR"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """Starts moto's ThreadedMotoServer on loopback; yields its storage_options for s3fs."""
    pytest.importorskip("s3fs", reason="s3fs is installed by `make test` (the 's3' extra)")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    opts = {"key": "testing-key", "secret": "testing-secret",
            "client_kwargs": {"endpoint_url": endpoint},
            "config_kwargs": {"retries": {"max_attempts": 2}, "connect_timeout": 5, "read_timeout": 30},
            "use_listings_cache": False}
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing-key", AWS_SECRET_ACCESS_KEY="testing-secret",
                      AWS_ENDPOINT_URL_S3=endpoint, AWS_DEFAULT_REGION="us-east-1")
    try:
        yield {"endpoint": endpoint, "storage_options": opts}
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_url(s3_server):
    """A fresh bucket on the session's S3 server; yields (url, storage_options)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    bucket = f"ucp-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield f"s3://{bucket}/ckpt", s3_server["storage_options"]


@pytest.fixture
def run_ranks():
    """The one helper every distributed test uses: ``run_ranks(fn, world_size, args=...)``."""
    from ucp.testing import run_ranks as _run

    return _run
