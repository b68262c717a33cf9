"""Object-store credentials are never printed: not in ucp's errors (message, repr, chained
causes), not in any log record (every logger, DEBUG), not in ``ucp inspect``/``ls``/``verify``
output, on success or failure. Credentials come as s3fs storage options, as ``-o`` options of the
CLI, or inside a URL (``scheme://user:password@host``, ``?sig=...``), which ucp redacts."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from click.testing import CliRunner

import ucp
from ucp.cli import main

SECRET = "SeCrEt-7a1c0ffee"


@pytest.fixture
def all_logs(caplog):
    caplog.set_level(logging.DEBUG)  # every logger: ucp's, s3fs's, botocore's, fsspec's
    return caplog


def _text(e: BaseException) -> str:
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts += [str(e), repr(e)]
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def _run(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every error, ucp's or not, is checked
        return _text(e)
    return ""


def test_storage_options_secret_in_api_errors_and_logs(server, all_logs):
    url = server.bucket("secret-api")
    opts = server.options(secret=SECRET)
    state = {"model": {"w": torch.ones(4, 2)}}
    texts = [
        _run(lambda: ucp.save(state, "s3://no-such-bucket/x", step=1, storage_options=opts).wait()),
        _run(lambda: ucp.load(url, storage_options=opts)),
        _run(lambda: ucp.save(state, url, step=1, storage_options=opts).wait()),
        _run(lambda: ucp.convert(url, url + "-u", storage_options=opts, dst_storage_options=opts, progress=False)),
        _run(lambda: ucp.open(url + "-u", storage_options=opts).read("w")),
        _run(lambda: ucp.load(url, storage_options={**opts, "config_kwargs": {"retries": SECRET}})),
        _run(lambda: ucp.load(url, storage_options={**opts, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}})),
    ]
    server.stop()
    try:
        texts.append(_run(lambda: ucp.load(url, storage_options=opts)))
        texts.append(_run(lambda: ucp.save(state, url, step=2, storage_options=opts).wait()))
    finally:
        server.start()
    assert sum(bool(t) for t in texts) >= 5  # the failures happened
    assert all(SECRET not in t for t in texts), [t for t in texts if SECRET in t][0][:500]
    assert SECRET not in all_logs.text


@pytest.mark.parametrize("url", [f"http://user:{SECRET}@127.0.0.1:9/ckpt", f"ftp://{SECRET}@127.0.0.1:9/ckpt",
                                 f"http://127.0.0.1:9/ckpt?X-Amz-Signature={SECRET}&sig={SECRET}"])
def test_credentials_in_a_url_are_redacted(url, caplog):
    caplog.set_level(logging.DEBUG, logger="ucp")
    texts = [_run(lambda: ucp.load(url)), _run(lambda: ucp.save({"w": torch.ones(2)}, url, step=1).wait()),
             _run(lambda: ucp.convert(url, url + "u", progress=False))]
    assert all(texts) and all(SECRET not in t.split("Error", 1)[-1] or "***" in t for t in texts)
    ucp_errors = [t.split("\n")[0] for t in texts]
    assert all(SECRET not in t and "***" in t for t in ucp_errors), ucp_errors
    ucp_logs = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("ucp"))
    assert SECRET not in ucp_logs


def _cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output + (res.stderr if res.stderr_bytes is not None else "")


def test_cli_output(server, all_logs):
    url = server.bucket("secret-cli")
    opts = server.options(secret=SECRET)
    ucp.save({"model": {"w": torch.ones(4, 2)}}, url, step=1, storage_options=opts).wait()
    o = ["-o", "key=testing-key", "-o", f"secret={SECRET}", "-o", f"endpoint_url={server.endpoint}",
         "-o", "config_kwargs.retries.max_attempts=1", "-o", "config_kwargs.connect_timeout=1",
         "-o", "skip_instance_cache=true"]
    outputs = [_cli("inspect", url, *o), _cli("inspect", url, "--json", *o), _cli("ls", url, *o),
               _cli("verify", url, *o), _cli("inspect", url + "-missing", *o)]
    assert outputs[0][0] == 0 and json.loads(outputs[1][1])["format"]
    server.stop()
    try:
        outputs += [_cli("inspect", url, *o), _cli("verify", url, *o)]
    finally:
        server.start()
    assert outputs[-1][0] != 0
    leaked = [out for _, out in outputs if SECRET in out]
    assert not leaked, leaked[0][:500]
    assert SECRET not in all_logs.text
