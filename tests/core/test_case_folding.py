"""Names equal but for case would share one directory on macOS, Windows and SMB shares: refused
when converting, and refused when reading a checkpoint whose table holds such paths."""

from __future__ import annotations

import json

import pytest
import torch

import ucp
from ucp.native._meta import seal


def test_convert_refuses_names_that_differ_only_in_case(tmp_path):
    ucp.save({"Wq.weight": torch.ones(2), "wq.weight": torch.zeros(2)}, tmp_path / "src", step=1).wait()
    with pytest.raises(ucp.ConvertError, match="'Wq.weight' and 'wq.weight'.*differ only in case"):
        ucp.convert(str(tmp_path / "src"), str(tmp_path / "u"))
    assert not (tmp_path / "u").exists()


def test_reader_refuses_a_table_with_case_colliding_paths(tmp_path):
    ucp.save({"a": torch.ones(2), "b": torch.zeros(2)}, tmp_path / "src", step=1).wait()
    ucp.convert(str(tmp_path / "src"), str(tmp_path / "u"))
    meta_file = tmp_path / "u" / "zarr.json"
    doc = json.loads(meta_file.read_text())
    attrs = doc["attributes"]["ucp"]
    attrs["params"]["b"]["path"] = "params/A"  # as if "A" and "a" had been converted on Linux
    (tmp_path / "u" / "params" / "b").rename(tmp_path / "u" / "params" / "A")
    doc["attributes"]["ucp"] = seal(attrs)
    meta_file.write_text(json.dumps(doc))
    with pytest.raises(ucp.CorruptCheckpointError, match="'a' and 'b' are stored at paths that differ only in case"):
        ucp.open(str(tmp_path / "u"))
