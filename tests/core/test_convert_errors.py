"""Bad input to `ucp convert`: one-line errors naming the file and the problem, exit 1, and never a
complete-looking universal checkpoint left behind."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import ucp
from ucp.cli import main


def _convert(src, dst):
    return CliRunner().invoke(main, ["convert", str(src), str(dst), "-q"])


def _assert_not_complete(dst):
    meta = dst / "zarr.json"
    if meta.exists():
        assert json.loads(meta.read_text())["attributes"]["ucp"]["complete"] is False
    with pytest.raises(ucp.UcpError):
        ucp.open(str(dst))


@pytest.fixture
def native(tmp_path):
    state = {"model": {"w": torch.randn(64, 8), "b": torch.randn(8)},
             "optim": {"state": {"w": {"exp_avg": torch.randn(64, 8)}}, "param_groups": [{"params": ["w"], "lr": 1.0}]}}
    ucp.save(state, tmp_path / "src", step=2).wait()
    return tmp_path / "src"


def test_unknown_layout(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"\0" * 64)
    res = _convert(tmp_path / "junk", tmp_path / "u")
    assert res.exit_code == 1
    assert res.stderr.startswith("Error: ") and "no engine recognises" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    _assert_not_complete(tmp_path / "u")


def test_missing_source(tmp_path):
    res = _convert(tmp_path / "nowhere", tmp_path / "u")
    assert res.exit_code == 1 and "Error: " in res.stderr


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_names_the_file(native, tmp_path, damage):
    shard = native / "step-00000002" / "rank-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    if damage == "truncate":
        raw = raw[:-16]
    else:
        raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    res = _convert(native, tmp_path / "u")
    assert res.exit_code == 1 and "rank-00000.safetensors" in res.stderr, res.stderr
    _assert_not_complete(tmp_path / "u")


def test_damaged_manifest(native, tmp_path):
    (native / "step-00000002" / "manifest.json").write_text("{not json")
    res = _convert(native, tmp_path / "u")
    assert res.exit_code == 1 and "manifest.json" in res.stderr and "JSON" in res.stderr


def test_spec_that_does_not_parse(native, tmp_path):
    res = CliRunner().invoke(main, ["convert", str(native), str(tmp_path / "u"), "-q", "--spec",
                                    'param "w" split tp dim'])
    assert res.exit_code == 1 and "Error: " in res.stderr and "<string>:1:23" in res.stderr, res.stderr


def test_usage_error_exits_2(native):
    res = CliRunner().invoke(main, ["convert", str(native)])
    assert res.exit_code == 2


def test_bit_flip_in_universal_chunk_is_detected(native, tmp_path):
    ckpt = ucp.convert(str(native), str(tmp_path / "u"))
    chunk = next(p for p in (tmp_path / "u" / "params" / "w" / "fp32").rglob("*") if p.is_file()
                 and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0x01
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ucp.ChecksumError, match="params/w/fp32"):
        ckpt.read("w", "fp32")
