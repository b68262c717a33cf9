"""ucp inspect: every format, a table for people and stable JSON for scripts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ucp.cli import main

from ._sample import HIDDEN, VOCAB, gpt2_state

INSPECT_KEYS = {"schema", "schema_version", "url", "format", "description", "engine", "step",
                "topology", "world_size", "commit", "spec", "files", "size_on_disk",
                "bytes_exact", "totals", "params", "buffers", "param_groups", "steps", "notes"}
PARAM_KEYS = {"name", "shape", "dtype", "states", "bytes", "frozen", "group"}


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, (result.output, result.stderr)
    return result


def inspect_json(*args: str) -> dict:
    doc = json.loads(run("inspect", "--json", *args).stdout)
    assert set(doc) == INSPECT_KEYS and doc["schema"] == "ucp.inspect"
    assert doc["schema_version"] == 1
    for p in doc["params"] + doc["buffers"]:
        assert set(p) == PARAM_KEYS
    return doc


def test_native_root_json(sample):
    doc = inspect_json(str(sample / "ckpt"))
    model = gpt2_state()
    assert doc["format"] == doc["engine"] == "ucp" and doc["commit"] == "committed"
    assert doc["step"] == 200 and doc["world_size"] == 1
    assert [p["name"] for p in doc["params"]] == list(model)
    wte = doc["params"][0]
    assert wte["shape"] == [VOCAB, HIDDEN] and wte["dtype"] == "float32"
    assert set(wte["states"]) == {"fp32", "exp_avg", "exp_avg_sq", "step"} and wte["group"] == 0
    assert wte["bytes"] == 3 * VOCAB * HIDDEN * 4 + 4  # fp32 + two moments + the step scalar
    assert doc["totals"]["elements"] == sum(t.numel() for t in model.values())
    assert doc["totals"]["params"] == len(model)
    assert doc["param_groups"] == [{"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}]
    assert [(s["step"], s["committed"], s["latest"]) for s in doc["steps"]] == [
        (100, True, False), (200, True, True), (300, False, False)]
    assert doc["bytes_exact"] is False and doc["files"] == 2


def test_native_table_and_step_option(sample):
    out = run("inspect", str(sample / "ckpt"), "--step", "100").stdout
    assert "step        100" in out and "commit      committed" in out
    assert "step 100 (2 committed step(s) under the root)" in out.splitlines()[0]
    lines = out.splitlines()
    row = next(l for l in lines if l.startswith("transformer.h.1.mlp.c_fc.weight "))
    assert row.split() == ["transformer.h.1.mlp.c_fc.weight", "[16,", "64]", "float32",
                           "fp32,step,exp_avg,exp_avg_sq", "12.0", "KiB"]
    header = next(i for i, l in enumerate(lines) if l.startswith("NAME"))
    assert lines[header].split() == ["NAME", "SHAPE", "DTYPE", "STATES", "BYTES"]
    assert lines[-2].startswith(f"total: {len(gpt2_state())} parameters")


def test_uncommitted_step_and_missing_step(sample):
    doc = inspect_json(str(sample / "ckpt" / "step-00000300"))
    assert doc["commit"] == "uncommitted" and doc["step"] == 300 and doc["params"] == []
    r = run("inspect", str(sample / "ckpt"), "--step", "300", code=1)
    assert r.stderr.startswith("Error: step 300 is not committed") and r.stderr.count("\n") == 1


def test_universal(sample):
    doc = inspect_json(str(sample / "universal"))
    assert doc["format"] == "universal" and doc["engine"] == "ucp" and doc["step"] == 200
    assert doc["commit"] == "committed" and doc["bytes_exact"] is True
    wte = doc["params"][0]
    assert wte["bytes"] == 3 * VOCAB * HIDDEN * 4 + 4
    assert doc["totals"]["bytes"] == sum(p["bytes"] for p in doc["params"])


def test_incomplete_universal(copy_of):
    u = copy_of("universal")
    meta = json.loads((u / "zarr.json").read_text())
    meta["attributes"]["ucp"]["complete"] = False
    (u / "zarr.json").write_text(json.dumps(meta))
    doc = inspect_json(str(u))
    assert doc["commit"] == "incomplete" and doc["params"] == []


def test_safetensors_file_and_hf_directory(tmp_path):
    a = {"x.weight": torch.zeros(3, 4, dtype=torch.bfloat16), "x.bias": torch.ones(4)}
    b = {"y": torch.zeros(2, dtype=torch.int64)}
    save_file(a, tmp_path / "model-00001-of-00002.safetensors")
    save_file(b, tmp_path / "model-00002-of-00002.safetensors")
    doc = inspect_json(str(tmp_path / "model-00001-of-00002.safetensors"))
    assert doc["format"] == "safetensors" and {p["name"]: p["bytes"] for p in doc["params"]} == {
        "x.weight": 24, "x.bias": 16}
    index = {"metadata": {"total_size": 56}, "weight_map": {
        "x.weight": "model-00001-of-00002.safetensors", "x.bias": "model-00001-of-00002.safetensors",
        "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    doc = inspect_json(str(tmp_path))
    assert sorted((p["name"], p["dtype"]) for p in doc["params"]) == [
        ("x.bias", "float32"), ("x.weight", "bfloat16"), ("y", "int64")]
    assert doc["totals"]["bytes"] == 56 and doc["files"] == 2


def test_deepspeed(deepspeed_ckpt):
    doc = inspect_json(str(deepspeed_ckpt.root))
    assert doc["format"] == "deepspeed" and doc["step"] == 3
    assert doc["topology"] == {"dp": 2, "tp": 1, "pp": 1, "ep": 1, "sp": 1, "zero": 2}
    rows = {p["name"]: p for p in doc["params"]}
    assert set(rows) == set(deepspeed_ckpt.expected)
    assert rows["f.weight"]["frozen"] and rows["f.weight"]["states"] == ["param"]
    assert rows["a.weight"]["dtype"] == "bfloat16" and rows["a.weight"]["shape"] == [4, 3]
    assert {b["name"] for b in doc["buffers"]} == set(deepspeed_ckpt.buffers)


def test_dcp(dcp_ckpt):
    path, model = dcp_ckpt
    doc = inspect_json(str(path))
    assert doc["format"] == "dcp" and doc["commit"] == "committed"
    assert {p["name"]: p["shape"] for p in doc["params"]} == {
        k: list(v.shape) for k, v in model.items()}
    # an fp32 model's weights are its fp32 state: counted once
    assert [p["bytes"] for p in doc["params"]] == [math.prod(v.shape) * 4 for v in model.values()]


@pytest.mark.parametrize("what", ["missing", "empty"])
def test_nothing_there_is_one_line_error(tmp_path, what):
    path = tmp_path / "x"
    if what == "empty":
        path.mkdir()
    r = run("inspect", str(path), code=1)
    assert r.stdout == "" and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
