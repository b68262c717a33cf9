"""Oversized metadata files are refused before their bytes are read (bounded memory)."""

from __future__ import annotations

import resource

import pytest
import torch

import ucp
from ucp.native._meta import MAX_JSON_BYTES
from ucp.storage import Storage

HUGE = 64 * MAX_JSON_BYTES  # 16 GiB, sparse: costs no disk


def _rss_mib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _inflate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(HUGE)


@pytest.fixture
def native(tmp_path):
    ucp.save({"w": torch.ones(4)}, str(tmp_path / "n"), step=1).wait()
    return tmp_path / "n"


def test_oversized_manifest(native):
    _inflate(native / "step-00000001" / "manifest.json")
    before = _rss_mib()
    with pytest.raises(ucp.CorruptCheckpointError, match=r"step-00000001/manifest.json: more than"):
        ucp.load(str(native))
    assert _rss_mib() - before < 64


def test_oversized_rank_index(native):
    _inflate(native / "step-00000001" / "rank-00000.json")
    with pytest.raises(ucp.ChecksumError, match=r"rank-00000.json: size 17179869184 differs"):
        ucp.load(str(native))


def test_oversized_universal_metadata(native, tmp_path):
    ucp.convert(str(native), str(tmp_path / "u"), progress=False)
    _inflate(tmp_path / "u" / "zarr.json")
    with pytest.raises(ucp.CorruptCheckpointError, match=r"/u/zarr.json: more than"):
        ucp.open(str(tmp_path / "u"))


def test_ranged_read_on_fsspec_storage():
    st = Storage("memory://ucp-oversized")
    st.write("m.json", b"x" * 100)
    assert st.read("m.json", max_bytes=100) == b"x" * 100
    with pytest.raises(ucp.CorruptCheckpointError, match="m.json: more than the 99 bytes"):
        st.read("m.json", max_bytes=99)


def _cli(*args):
    from click.testing import CliRunner

    from ucp.cli import main

    return CliRunner().invoke(main, list(args))


def test_oversized_metadata_named_by_every_reader(native, tmp_path):
    """inspect of a universal checkpoint and of an export (its HF index), verify (a rank index),
    and ls (``latest``) read at most their bound, never the whole 16 GiB file."""
    ucp.save({"w": torch.ones(4), "b": torch.zeros(4)}, str(tmp_path / "two"), step=1).wait()
    ucp.convert(str(tmp_path / "two"), str(tmp_path / "u"), progress=False)
    assert _cli("export", str(tmp_path / "u"), str(tmp_path / "hf"), "--max-shard-size", "8", "-q").exit_code == 0
    for victim in (tmp_path / "u" / "zarr.json", tmp_path / "hf" / "model.safetensors.index.json"):
        _inflate(victim)
        res = _cli("inspect", str(victim.parent))
        assert res.exit_code == 1 and "more than" in res.output and victim.name in res.output, res.output
    _inflate(native / "step-00000001" / "rank-00000.json")
    res = _cli("verify", str(native))
    assert res.exit_code == 1 and "rank-00000.json" in res.output, res.output
    _inflate(native / "latest")
    before = _rss_mib()
    res = _cli("ls", str(native))
    assert res.exit_code == 0 and _rss_mib() - before < 64, res.output
