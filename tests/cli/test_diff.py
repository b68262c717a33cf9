"""ucp diff: the classic silent conversion bugs (gate/up halves swapped, GQA heads permuted, an
expert dropped, a moment zeroed) planted between a source and its conversion are each named by
parameter and state; a faithful conversion is equal; tolerances, --states and --json."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import ucp
from ucp.universal._checkpoint import UniversalWriter, escape_name
from ucp.cli import main

from ._sample import training_state

HIDDEN, INTER, KV, Q_PER_KV, HEAD = 6, 8, 2, 2, 2
GATE_UP = "layers.0.mlp.gate_up.weight"
QKV = "layers.0.attn.qkv.weight"


def moe_state() -> dict[str, torch.Tensor]:
    """A tiny layer with a fused gate/up weight, grouped GQA qkv ([q.., k, v] per KV group) and
    two experts."""
    g = torch.Generator().manual_seed(0)
    return {GATE_UP: torch.randn(2 * INTER, HIDDEN, generator=g),
            QKV: torch.randn(KV * (Q_PER_KV + 2) * HEAD, HIDDEN, generator=g),
            "layers.0.experts.0.w1.weight": torch.randn(4, HIDDEN, generator=g),
            "layers.0.experts.1.w1.weight": torch.randn(4, HIDDEN, generator=g),
            "norm.weight": torch.ones(HIDDEN)}


def swap_gate_up(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[INTER:], t[:INTER]])


def permute_gqa(t: torch.Tensor) -> torch.Tensor:
    groups = t.reshape(KV, Q_PER_KV + 2, HEAD, HIDDEN)
    return groups[:, [1, 0, 2, 3]].reshape(t.shape)  # the two query heads of each group swapped


def zero(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    ucp.save(training_state(moe_state()), str(root / "src"), step=3).wait()
    return root / "src"


def plant(monkeypatch, name: str, state: str, bug) -> None:
    """Makes the conversion's writer apply ``bug`` to one parameter state (``write_later``: what
    convert and ``write`` both call)."""
    write = UniversalWriter.write_later

    def buggy(self, path, tensor, **kw):
        return write(self, path, bug(tensor) if path == f"params/{escape_name(name)}/{state}" else tensor, **kw)
    monkeypatch.setattr(UniversalWriter, "write_later", buggy)


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def test_a_faithful_conversion_is_equal(source, tmp_path):
    ucp.convert(str(source), str(tmp_path / "u"))
    out = run("diff", str(source), str(tmp_path / "u"), "--json").stdout
    doc = json.loads(out)
    assert doc["equal"] and doc["counts"]["different"] == 0 and doc["counts"]["equal"] >= 15
    assert {(e["name"], e["state"]) for e in doc["entries"]} >= {(GATE_UP, "exp_avg_sq"), (QKV, "fp32"), ("norm.weight", "step")}


@pytest.mark.parametrize("name, state, bug", [(GATE_UP, "fp32", swap_gate_up), (QKV, "fp32", permute_gqa),
                                              (GATE_UP, "exp_avg_sq", zero)],
                         ids=["swap-gate-up", "permute-gqa-heads", "zero-moment"])
def test_a_planted_bug_is_named(source, tmp_path, monkeypatch, name, state, bug):
    with monkeypatch.context() as m:
        plant(m, name, state, bug)
        ucp.convert(str(source), str(tmp_path / "u"), verify=False)
    result = run("diff", str(source), str(tmp_path / "u"), code=1)
    lines = [ln for ln in result.stdout.splitlines() if not ln.startswith(str(source))]
    assert len(lines) == 1 and lines[0].startswith(f"different {name} [{state}]  max abs "), result.stdout
    assert f"differ in 1 parameter state(s)" in result.stderr


def test_a_dropped_expert_is_missing(source, tmp_path, monkeypatch):
    from ucp.native._source import NativeCheckpoint

    names = NativeCheckpoint.names
    with monkeypatch.context() as m:
        m.setattr(NativeCheckpoint, "names", lambda self: [n for n in names(self) if ".experts.1." not in n])
        ucp.convert(str(source), str(tmp_path / "u"))
    doc = json.loads(run("diff", str(source), str(tmp_path / "u"), "--json", code=1).stdout)
    missing = {(e["name"], e["state"]) for e in doc["entries"] if e["status"] == "missing"}
    assert missing == {("layers.0.experts.1.w1.weight", s) for s in ("fp32", "exp_avg", "exp_avg_sq", "step")}
    assert doc["counts"]["different"] == 0 and not doc["equal"]
    back = json.loads(run("diff", str(tmp_path / "u"), str(source), "--json", code=1).stdout)
    assert {e["status"] for e in back["entries"] if e["name"].startswith("layers.0.experts.1")} == {"extra"}


def test_tolerances_and_states(source, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        plant(m, "norm.weight", "exp_avg", lambda t: t * (1 + 1e-3))
        ucp.convert(str(source), str(tmp_path / "u"), verify=False)
    u = str(tmp_path / "u")
    run("diff", str(source), u, code=1)
    run("diff", str(source), u, "--rtol", "1e-2")  # within tolerance: exit 0
    run("diff", str(source), u, "--states", "param,exp_avg_sq")  # the changed state left out
    doc = json.loads(run("diff", str(source), u, "--rtol", "1e-2", "--json").stdout)
    close = [e for e in doc["entries"] if e["status"] == "close"]
    assert [(e["name"], e["state"]) for e in close] == [("norm.weight", "exp_avg")]
    assert close[0]["max_rel"] == pytest.approx(1e-3, rel=1e-2)


def test_bands_of_a_chunked_array_are_compared_in_pieces(tmp_path, monkeypatch):
    """Two universal checkpoints: read band by band (a small band forces several)."""
    from ucp.ops import _diff

    big = {"w": torch.randn(2048, 64)}  # chunks of 256 rows
    ucp.save(training_state(big), str(tmp_path / "src"), step=1).wait()
    ucp.convert(str(tmp_path / "src"), str(tmp_path / "a"))
    with monkeypatch.context() as m:
        plant(m, "w", "exp_avg", lambda t: torch.cat([t[:-1], t[-1:] + 1]))
        ucp.convert(str(tmp_path / "src"), str(tmp_path / "b"), verify=False)
    monkeypatch.setattr(_diff, "BAND", 64 * 8)
    reads = []
    orig = _diff._Acc.add
    monkeypatch.setattr(_diff._Acc, "add", lambda self, a, b, **kw: (reads.append(a.shape[0]), orig(self, a, b, **kw)))
    report = _diff.diff_checkpoints(str(tmp_path / "a"), str(tmp_path / "b"), states=["exp_avg"])
    assert [(e.name, e.state, e.status) for e in report.entries] == [("w", "exp_avg", "different")]
    assert report.entries[0].max_abs == pytest.approx(1.0, rel=1e-4) and reads == [256] * 8


@pytest.mark.parametrize("name, state, bug", [(GATE_UP, "fp32", swap_gate_up), (QKV, "fp32", permute_gqa),
                                              (GATE_UP, "exp_avg_sq", zero)],
                         ids=["swap-gate-up", "permute-gqa-heads", "zero-moment"])
def test_convert_checks_its_output_by_default(source, tmp_path, monkeypatch, name, state, bug):
    plant(monkeypatch, name, state, bug)
    with pytest.raises(ucp.VerificationError, match=rf"^{name}: state '{state}' as written to .* differs "
                                                    r"from the source \(fingerprint [0-9a-f]{16}"):
        ucp.convert(str(source), str(tmp_path / "u"))
    result = run("convert", str(source), str(tmp_path / "u2"), code=1)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {name}: state '{state}' as written to ")
    run("convert", str(source), str(tmp_path / "u3"), "--no-verify")  # the check skipped


def test_convert_records_layout_independent_fingerprints(source, tmp_path):
    from ucp.core._fingerprint import fingerprint, to_hex

    ckpt = ucp.convert(str(source), str(tmp_path / "u"))
    meta = ckpt.metadata
    assert meta["fingerprint_algorithm"] == "ucp-fp1"
    for name, t in moe_state().items():
        assert meta["params"][name]["fingerprints"]["fp32"] == to_hex(fingerprint(t))
    run("convert", str(source), str(tmp_path / "plain"), "--no-verify")
    plain = ucp.open(str(tmp_path / "plain")).metadata
    assert "fingerprint_algorithm" not in plain and "fingerprints" not in plain["params"][GATE_UP]


def test_verify_deep_recomputes_the_recorded_fingerprints(source, tmp_path):
    u = str(tmp_path / "u")
    ucp.convert(str(source), u)
    out = run("verify", u, "--deep", "--json").stdout
    assert json.loads(out)["ok"] and "fingerprint (ucp-fp1) was recomputed" in out
    # values rewritten with valid checksums (same shape, dtype and array metadata): only --deep sees it
    good = ucp.open(u).read(GATE_UP, "exp_avg")
    UniversalWriter(u).write(f"params/{escape_name(GATE_UP)}/exp_avg", swap_gate_up(good))
    run("verify", u)
    doc = json.loads(run("verify", u, "--deep", "--json", code=1).stdout)
    assert [(p["kind"], p["where"]) for p in doc["problems"]] == [("fingerprint", f"{GATE_UP} (exp_avg)")]
    run("convert", str(source), str(tmp_path / "plain"), "--no-verify")
    assert "no fingerprints are recorded" in run("verify", str(tmp_path / "plain"), "--deep").stdout


def test_export_checks_each_tensor_against_the_recorded_fingerprint(source, tmp_path, monkeypatch):
    from ucp.ops import _export

    u = str(tmp_path / "u")
    ucp.convert(str(source), u)
    run("export", u, str(tmp_path / "hf"))  # faithful: passes the check
    read = _export._read
    monkeypatch.setattr(_export, "_read", lambda opened, item: swap_gate_up(read(opened, item))
                        if item.src == GATE_UP else read(opened, item))
    result = run("export", u, str(tmp_path / "hf2"), code=1)
    assert f"Error: {GATE_UP}: state 'param' as exported to " in result.stderr
    assert "differs from the checkpoint (fingerprint " in result.stderr
    assert not (tmp_path / "hf2" / "model.safetensors").exists()
    run("export", u, str(tmp_path / "hf3"), "--no-verify")


@pytest.mark.parametrize("shape, dtype", [((2048, 64), torch.float32), ((1000, 300), torch.bfloat16)])
def test_the_writer_fingerprints_the_chunks_it_encodes(tmp_path, monkeypatch, shape, dtype):
    """Multi-chunk arrays (edge chunks padded): the sum over encoded rows of chunks is the
    tensor's fingerprint, and an encoder that reads the wrong bytes is caught by convert's check."""
    from ucp.universal import _tiles
    from ucp.core._fingerprint import fingerprint, to_hex

    t = torch.randn(shape).to(dtype)
    calls = []
    tiles_print = _tiles.fingerprint_tiles
    monkeypatch.setattr(_tiles, "fingerprint_tiles", lambda *a: calls.append(a[1]) or tiles_print(*a))
    entry = UniversalWriter(str(tmp_path / "w")).write("params/w/fp32", t, fingerprint=True)
    assert entry["fingerprint"] == to_hex(fingerprint(t)) and len(calls) >= 4
    ucp.save(training_state({"w": t}), str(tmp_path / "src"), step=1).wait()
    init = _tiles.TiledShard.__init__

    def misread(self, data, *args, **kw):  # the encoder sees one value changed
        init(self, data, *args, **kw)
        self.data = data.copy()
        self.data.view(f"u{data.itemsize}")[-1, -1] ^= 1  # the last bit of the last element
        self.view = self.data.reshape(self.view.shape)
    monkeypatch.setattr(_tiles.TiledShard, "__init__", misread)
    with pytest.raises(ucp.VerificationError, match=r"^w: state '(param|fp32)' as written to "):
        ucp.convert(str(tmp_path / "src"), str(tmp_path / "u"))
