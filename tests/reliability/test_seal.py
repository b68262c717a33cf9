"""Manifests and the universal group metadata carry the checksum of their own content.

Nothing else records their checksum, so before they were sealed a bit flip in a spec, a topology or
an optimizer hyper-parameter went unnoticed and changed what a conversion produced.
"""

from __future__ import annotations

import json

import pytest
import torch

import ucp
from ucp.native._meta import CHECKSUM, dumps, loads, seal


def _flip_text(path, old: str, new: str) -> None:
    raw = path.read_bytes()
    assert raw.count(old.encode()) == 1, old
    path.write_bytes(raw.replace(old.encode(), new.encode()))


def test_flipped_spec_in_a_manifest_is_detected(tmp_path):
    spec = 'param "w" split tp dim 0'
    root = tmp_path / "ckpt"
    ucp.save({"w": torch.ones(4, 2)}, str(root), step=1, spec=spec).wait()
    manifest = root / "step-00000001" / "manifest.json"
    _flip_text(manifest, "dim 0", "dim 1")  # '0' ^ 0x01 == '1': one flipped bit
    with pytest.raises(ucp.ChecksumError, match=r"step-00000001/manifest.json: content does not match"):
        ucp.load(str(root))
    with pytest.raises(ucp.UcpError, match="manifest.json"):
        ucp.convert(str(root), str(tmp_path / "u"), progress=False)


def test_flipped_hyper_parameter_in_universal_metadata_is_detected(tmp_path):
    state = {"model": {"w": torch.randn(8, 4)}, "optim": {"state": {"w": {"exp_avg": torch.randn(8, 4)}},
                                                         "param_groups": [{"params": ["w"], "lr": 0.001}]}}
    ucp.save(state, str(tmp_path / "n"), step=1).wait()
    ucp.convert(str(tmp_path / "n"), str(tmp_path / "u"), progress=False)
    _flip_text(tmp_path / "u" / "zarr.json", '"lr": 0.001', '"lr": 0.003')  # '1' ^ 0x02 == '3'
    with pytest.raises(ucp.ChecksumError, match=r"/u/zarr.json: content does not match"):
        ucp.open(str(tmp_path / "u"))


def test_seal_survives_reformatting_and_unsealed_documents_still_load():
    doc = {"format_version": 1, "b": [1, 2.5, "é", None], "a": {"x": True}, "created": 1.0e-7}
    raw = dumps(doc)
    assert CHECKSUM in json.loads(raw)
    # another JSON writer's spacing and escaping do not change the content checksum
    assert loads(json.dumps(json.loads(raw), ensure_ascii=False, indent=4).encode(), what="x")["b"] == doc["b"]
    assert loads(json.dumps(doc).encode(), what="legacy") == doc  # written before sealing
    resealed = seal({**json.loads(raw), "b": [0]})
    assert loads(json.dumps(resealed).encode(), what="x")["b"] == [0]


@pytest.mark.parametrize("bad", ['{"format_version": 1, "checksum": "crc32c:0", "x": NaN}',
                                 '{"format_version": 1, "checksum": 5}'])
def test_bad_seals_are_errors(bad):
    with pytest.raises(ucp.UcpError, match="doc"):
        loads(bad.encode(), what="doc")
