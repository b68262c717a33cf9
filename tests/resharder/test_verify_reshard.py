"""ucp.reshard checks its output by default: the boxes every target rank holds (TP cuts of fused
and grouped tensors, ZeRO-1/3 flat partitions with padding, DP replicas) add up, state by state,
to the source's fingerprint; a bug planted between reading and writing is named."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import ucp
from ucp.cli import main
from ucp.native import _target as _targets
from ucp.resharder import _fingerprints

QKV = "decoder.layers.1.self_attention.linear_qkv.weight"


@pytest.fixture
def compared(monkeypatch):
    """The (name, state) pairs whose source fingerprint the check looked up."""
    seen = []
    orig = _fingerprints.source_fingerprint

    def spy(source, name, state):
        seen.append((name, state))
        return orig(source, name, state)
    monkeypatch.setattr(_fingerprints, "source_fingerprint", spy)
    return seen


@pytest.mark.parametrize("target,alignment", [("dp=2,tp=2,zero=1", 2), ("dp=2,pp=2,zero=3", 1),
                                              ("tp=4", 1)])
def test_every_state_of_every_layout_adds_up(llama, tmp_path, compared, target, alignment):
    ucp.reshard(llama[1], str(tmp_path / "out"), topology=target, alignment=alignment)
    src = ucp.open(llama[1])
    want = {(n, s) for n in src.names() for s in src.info(n).states
            if not src.info(n).frozen or s == "param"}  # a frozen parameter has no optimizer state
    assert want <= set(compared) and len(want) > 80


def test_from_a_distributed_save_the_source_is_fingerprinted_on_the_fly(llama, tmp_path, compared):
    meta = ucp.open(llama[1]).metadata  # the spec the conversion used, with its sizes
    spec = ucp.load_spec(meta["spec"], constants=meta["spec_constants"])
    ucp.reshard(llama[0], str(tmp_path / "out"), topology="dp=2,zero=1", spec=spec)
    assert (QKV, "exp_avg") in compared


def test_a_planted_bug_is_named_and_nothing_is_committed(llama, tmp_path, monkeypatch):
    read_plan = _targets.read_plan

    def buggy(plan, source, **kw):  # the two query heads of rank 1's first KV group swapped
        loaded = read_plan(plan, source, **kw)
        if plan.rank == 1:
            for path, t in loaded.tensors.items():
                if path[-2:] == ("decoder.layers.1.self_attention.linear_qkv.weight", "exp_avg"):
                    t[:8] = torch.cat([t[4:8], t[:4]]).clone()
        return loaded
    monkeypatch.setattr(_targets, "read_plan", buggy)
    with pytest.raises(ucp.VerificationError, match=rf"^{QKV}: state 'exp_avg' as resharded to .* differs "
                                                    r"from the source \(fingerprint [0-9a-f]{16} over all ranks"):
        ucp.reshard(llama[1], str(tmp_path / "out"), topology="tp=2")
    assert not list(tmp_path.glob("out/step-*/manifest.json"))
    result = CliRunner().invoke(main, ["reshard", llama[1], str(tmp_path / "cli"), "--to", "tp=2", "-q"])
    assert result.exit_code == 1 and f"Error: {QKV}: state 'exp_avg'" in result.stderr
    ucp.reshard(llama[1], str(tmp_path / "unchecked"), topology="tp=2", verify=False)


def test_the_deepspeed_target_checks_each_state_against_the_recorded_one(llama, tmp_path, monkeypatch):
    from ucp.engines.deepspeed import _target as _deepspeed
    from ucp.universal import UniversalSource

    checked = []
    check = _deepspeed.check_recorded
    monkeypatch.setattr(_deepspeed, "check_recorded", lambda src, n, s, t, d: (checked.append((n, s)),
                                                                                check(src, n, s, t, d)))
    ucp.reshard(llama[1], str(tmp_path / "ok"), topology="dp=2", engine="deepspeed-universal")
    assert (QKV, "exp_avg_sq") in checked and len(checked) > 60
    read = UniversalSource.read
    monkeypatch.setattr(UniversalSource, "read", lambda self, n, s, r: torch.zeros_like(read(self, n, s, r))
                        if (n, s) == (QKV, "exp_avg_sq") else read(self, n, s, r))
    with pytest.raises(ucp.VerificationError, match=rf"^{QKV}: state 'exp_avg_sq' as resharded to .*zero/{QKV} "
                                                    r"differs from the source"):
        ucp.reshard(llama[1], str(tmp_path / "bad"), topology="dp=2", engine="deepspeed-universal")
