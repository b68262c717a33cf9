"""``ucp diff`` across engines and layouts: a real DeepSpeed ZeRO-2 checkpoint (flat partitions
over two ranks) against its universal conversion is equal state by state; a moment zeroed on
the way (the conversion's writer handed zeros) is named, and the built-in check names it too."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import ucp
from ucp.cli import main
from ucp.universal._checkpoint import UniversalWriter, escape_name


@pytest.mark.slow
def test_diff_a_deepspeed_checkpoint_against_its_conversion(ds_checkpoint, tmp_path, monkeypatch):
    src, _ = ds_checkpoint("z2_bf16_dp2")
    ucp.convert(str(src), str(tmp_path / "u"))
    res = CliRunner().invoke(main, ["diff", str(src), str(tmp_path / "u"), "--json"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    doc = json.loads(res.stdout)
    assert doc["equal"] and doc["counts"]["equal"] >= 4 * len(ucp.open(str(tmp_path / "u")).names()) - 1

    name = sorted(n for n in ucp.open(str(tmp_path / "u")).names() if n.endswith("weight"))[0]
    write = UniversalWriter.write_later

    def zeroed(self, path, tensor, **kw):
        hit = path == f"params/{escape_name(name)}/exp_avg"
        return write(self, path, torch.zeros_like(tensor) if hit else tensor, **kw)
    with monkeypatch.context() as m:
        m.setattr(UniversalWriter, "write_later", zeroed)
        with pytest.raises(ucp.VerificationError, match=rf"^{name}: state 'exp_avg' as written"):
            ucp.convert(str(src), str(tmp_path / "checked"))
        ucp.convert(str(src), str(tmp_path / "bad"), verify=False)
    res = CliRunner().invoke(main, ["diff", str(src), str(tmp_path / "bad"), "--json"])
    assert res.exit_code == 1, (res.stdout, res.stderr)
    different = [(e["name"], e["state"]) for e in json.loads(res.stdout)["entries"] if e["status"] == "different"]
    assert different == [(name, "exp_avg")]
