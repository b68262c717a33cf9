"""Per-fragment fingerprints of native saves (issue 16): each fragment records the partial
fingerprint of its region, and the fragments of a tensor (one rank's plain tensors; DTensor
shards over two ranks, rank 1's index a version 2 member index) add up to the tensor's
fingerprint; ``convert`` checks its output against them, so a bug in assembling the fragments
is named; ``verify --deep`` recomputes them from the data."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import ucp
from ucp.cli import main
from ucp.core._fingerprint import ALGORITHM, fingerprint
from ucp.engines._open import open_source
from ucp.native import _save
from ucp.native._source import NativeCheckpoint

from ._sample import training_state
from .test_diff import GATE_UP, moe_state, swap_gate_up


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("fpn")
    ucp.save(training_state(moe_state()), str(root / "src"), step=3).wait()
    return root / "src"


@pytest.fixture(scope="module")
def dtensor_root(tmp_path_factory):
    """A DTensor save over two ranks on gloo (``_ranks.fingerprint_ranks``)."""
    from ucp.testing import run_ranks

    from ._ranks import fingerprint_ranks

    root = tmp_path_factory.mktemp("fpn-dtensor")
    run_ranks(fingerprint_ranks, 2, args=(str(root),))
    return root / "dtensor"


def _fragments(root) -> list[dict]:
    return [f for p in sorted(root.glob("step-*/rank-*.json")) for f in json.loads(p.read_text())["fragments"]]


def test_a_save_records_each_fragments_fingerprint(source):
    frags = _fragments(source)
    assert len(frags) >= 15 and all(f["fingerprint"].startswith(f"{ALGORITHM}:") for f in frags)
    src, _ = open_source(str(source))
    state = training_state(moe_state())
    for name, t in moe_state().items():
        assert src.recorded_fingerprint(name, "fp32") == fingerprint(t)
        assert src.recorded_fingerprint(name, "exp_avg_sq") == fingerprint(state["optim"]["state"][name]["exp_avg_sq"])


def test_convert_takes_the_source_fingerprints_from_the_fragments(source, tmp_path, monkeypatch):
    from ucp.ops import _convert

    calls = []
    real = _convert.fingerprint
    monkeypatch.setattr(_convert, "fingerprint", lambda t: (calls.append(t.shape), real(t))[1])
    ckpt = ucp.convert(str(source), str(tmp_path / "u"))
    assert calls == []  # no state fingerprinted again on the source side
    for name, t in moe_state().items():
        assert ckpt.metadata["params"][name]["fingerprints"]["fp32"] == \
            _hex(open_source(str(source))[0].recorded_fingerprint(name, "fp32")) == _hex(fingerprint(t))


def _hex(v: int) -> str:
    return f"{v:016x}"


def test_a_bug_in_assembling_fragments_is_named_by_convert(source, tmp_path, monkeypatch):
    """The values the source reader hands over are wrong (gate and up swapped while assembling):
    fingerprinting them again would agree with the output; the fragments' records do not."""
    assemble = NativeCheckpoint._assemble

    def buggy(self, name, state, frags):
        t = assemble(self, name, state, frags)
        return swap_gate_up(t) if name == GATE_UP and state == "exp_avg" else t
    monkeypatch.setattr(NativeCheckpoint, "_assemble", buggy)
    with pytest.raises(ucp.VerificationError, match=rf"^{GATE_UP}: state 'exp_avg' as written to .* "
                                                    r"differs from the source"):
        ucp.convert(str(source), str(tmp_path / "u"))
    ucp.convert(str(source), str(tmp_path / "u2"), verify=False)  # unchecked, it goes through


def test_verify_deep_recomputes_fragment_fingerprints(tmp_path, monkeypatch):
    ok = tmp_path / "ok"
    ucp.save(training_state(moe_state()), str(ok), step=1).wait()
    doc = _verify(str(ok), "--deep", code=0)
    assert any("fingerprint" in n and "recomputed" in n for n in doc["notes"])
    # a fragment whose recorded fingerprint is not its values' (as if they changed after it was taken)
    real = _save._fingerprint
    monkeypatch.setattr(_save, "_fingerprint", lambda frag, t: real(frag, t + 1 if "exp_avg_sq" in frag.key
                                                                     and GATE_UP in frag.key else t))
    bad = tmp_path / "bad"
    ucp.save(training_state(moe_state()), str(bad), step=1).wait()
    _verify(str(bad), code=0)  # the checksums hold
    doc = _verify(str(bad), "--deep", code=1)
    assert [p["kind"] for p in doc["problems"]] == ["fingerprint"]
    assert GATE_UP in doc["problems"][0]["where"] and "exp_avg_sq" in doc["problems"][0]["where"]


def _verify(*args: str, code: int) -> dict:
    result = CliRunner().invoke(main, ["verify", "--json", *args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_dtensor_shards_over_two_ranks_add_up(dtensor_root):
    root = dtensor_root
    docs = [json.loads(p.read_text()) for p in sorted(root.glob("step-*/rank-*.json"))]
    assert "like" in docs[1] and len(docs[1]["fingerprints"]) == len(docs[0]["fragments"])  # a member index
    src, _ = open_source(str(root))
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(10, 6, generator=g).bfloat16(), torch.randn(6, generator=g)
    assert src.recorded_fingerprint("w", "param") == fingerprint(w)
    assert src.recorded_fingerprint("w", "exp_avg") == fingerprint(w.float() * 3)
    assert src.recorded_fingerprint("b", "param") == fingerprint(b)
    _verify(str(root), "--deep", code=0)


def test_diff_across_layouts_names_a_planted_bug(dtensor_root, tmp_path, monkeypatch):
    """A DTensor save over two ranks (rows cut, columns cut) against its universal conversion:
    equal; against a conversion whose reader swapped two rows of one state, that state is named."""
    src = str(dtensor_root)
    ucp.convert(src, str(tmp_path / "u"))
    result = CliRunner().invoke(main, ["diff", src, str(tmp_path / "u"), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["equal"], result.stdout
    assemble = NativeCheckpoint._assemble
    monkeypatch.setattr(NativeCheckpoint, "_assemble", lambda self, name, state, frags: (
        lambda t: t[[1, 0, *range(2, t.shape[0])]] if (name, state) == ("w", "exp_avg") else t)(
            assemble(self, name, state, frags)))
    with pytest.raises(ucp.VerificationError, match=r"^w: state 'exp_avg' as written"):
        ucp.convert(src, str(tmp_path / "checked"))
    ucp.convert(src, str(tmp_path / "bad"), verify=False)
    monkeypatch.undo()
    result = CliRunner().invoke(main, ["diff", src, str(tmp_path / "bad"), "--json"])
    assert result.exit_code == 1
    assert [(e["name"], e["state"]) for e in json.loads(result.stdout)["entries"]
            if e["status"] == "different"] == [("w", "exp_avg")]


def test_export_from_a_native_step_checks_against_the_fragments(source, tmp_path, monkeypatch):
    from ucp.ops import _export

    result = CliRunner().invoke(main, ["export", str(source), str(tmp_path / "hf")])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    read = _export._read
    monkeypatch.setattr(_export, "_read", lambda opened, item: swap_gate_up(read(opened, item))
                        if item.src == GATE_UP else read(opened, item))
    result = CliRunner().invoke(main, ["export", str(source), str(tmp_path / "hf2")])
    assert result.exit_code == 1
    assert f"Error: {GATE_UP}: state 'param' as exported to " in result.stderr
    assert not (tmp_path / "hf2" / "model.safetensors").exists()
