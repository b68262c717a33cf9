"""Auto-detection that fails names the engine that came closest and why it refused the path."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

import ucp
from ucp.cli import main


def _fail(*args: str) -> str:
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == 1, res.output
    assert res.stderr.startswith("Error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    return res.stderr


@pytest.fixture
def unfinished_dcp(tmp_path):
    """A DCP save whose .metadata was never written (the job died before the coordinator's commit)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": {"w": torch.arange(6.0)}}, checkpoint_id=str(tmp_path / "dcp"))
    (tmp_path / "dcp" / ".metadata").unlink()
    return tmp_path / "dcp"


def test_dcp_without_metadata_is_named_by_convert_and_inspect(unfinished_dcp, tmp_path):
    want = "closest: dcp: 1 .distcp data file(s) but no .metadata: the save did not finish"
    with pytest.raises(ucp.ConvertError, match="no engine recognises") as e:
        ucp.convert(str(unfinished_dcp), str(tmp_path / "u"))
    assert want in str(e.value) and e.value.closest.startswith("dcp: ")
    assert want in _fail("convert", str(unfinished_dcp), str(tmp_path / "u2"), "-q")
    assert want in _fail("inspect", str(unfinished_dcp))


def test_uncommitted_native_step_is_named(tmp_path):
    ucp.save({"w": torch.ones(4)}, tmp_path / "n", step=3).wait()
    step = next((tmp_path / "n").glob("step-*"))
    shutil.copytree(step, tmp_path / "copy")  # a step directory on its own...
    (tmp_path / "copy" / "manifest.json").unlink(missing_ok=True)  # ...whose commit never happened
    (tmp_path / "copy" / "latest").unlink(missing_ok=True)
    msg = _fail("convert", str(tmp_path / "copy"), str(tmp_path / "u"), "-q")
    assert "closest: ucp: " in msg and "no manifest.json: this step was never committed" in msg


def test_deepspeed_latest_naming_a_missing_tag(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "latest").write_text("global_step9")
    msg = _fail("convert", str(tmp_path / "ds"), str(tmp_path / "u"), "-q")
    assert "closest: deepspeed: 'latest' names the tag 'global_step9', which is not a directory here" in msg


def test_a_refusal_ranks_before_a_near_miss(unfinished_dcp, tmp_path):
    """An engine that knows the layout but cannot read it is closer than a look-alike."""
    (unfinished_dcp / "global_step1").mkdir()
    (unfinished_dcp / "latest").write_text("global_step1")
    (unfinished_dcp / "global_step1" / "mp_rank_00_model_states.pt").write_bytes(b"not a torch file")
    with pytest.raises(ucp.ConvertError) as e:
        ucp.convert(str(unfinished_dcp), str(tmp_path / "u"))
    assert e.value.closest.startswith("deepspeed: ") and "refused it" in e.value.closest
    assert "; also dcp: 1 .distcp data file(s)" in str(e.value)


def test_nothing_alike_says_no_closest(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"\0" * 8)
    msg = _fail("convert", str(tmp_path / "junk"), str(tmp_path / "u"), "-q")
    assert "no engine recognises this checkpoint (tried ucp, " in msg and "closest" not in msg
    assert all(name in msg for name in ("dcp", "deepspeed", "megatron", "hf"))
