"""ucp verify: checksums, coverage, shapes against the spec; exit 0/1 with the problems."""

from __future__ import annotations

import json
from pathlib import Path

import crc32c
import pytest
import torch
from click.testing import CliRunner

from ucp.cli import main

from ._sample import HIDDEN, POSITIONS, gpt2_state, small_gpt2_spec

VERIFY_KEYS = {"schema", "schema_version", "url", "format", "step", "ok", "checked", "problems",
               "notes"}


def verify(*args: str, code: int) -> dict:
    result = CliRunner().invoke(main, ["verify", "--json", *args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    doc = json.loads(result.stdout)
    assert set(doc) == VERIFY_KEYS and doc["schema"] == "ucp.verify" and doc["schema_version"] == 1
    assert doc["ok"] == (code == 0) and (not doc["problems"]) == (code == 0)
    for p in doc["problems"]:
        assert set(p) == {"kind", "where", "message"}
    if code:
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    return doc


def kinds(doc: dict) -> set[tuple[str, str]]:
    return {(p["kind"], p["where"]) for p in doc["problems"]}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def write_json(path: Path, doc: dict) -> None:
    """Writes edited metadata as ucp would (sealed with its own checksum where ucp seals)."""
    try:
        from ucp.native._meta import seal
    except ImportError:  # a ucp that does not seal its metadata
        seal = dict
    path.write_text(json.dumps(seal(doc) if "checksum" in doc else doc))


def rerecord(step: Path, name: str) -> None:
    """Updates the manifest's record of ``name`` so its (edited) bytes pass the file checksum."""
    manifest = json.loads((step / "manifest.json").read_text())
    data = (step / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "crc32c": crc32c.crc32c(data)}
    write_json(step / "manifest.json", manifest)


def tensor_offset(path: Path, key: str) -> int:
    """Where tensor ``key``'s bytes start in a safetensors file."""
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + n])
    return 8 + n + header[key]["data_offsets"][0]


# -- native ---------------------------------------------------------------------------------------

def test_native_ok(sample):
    doc = verify(str(sample / "ckpt"), code=0)
    model = gpt2_state()
    assert doc["format"] == "ucp" and doc["step"] == 200
    assert doc["checked"]["files"] == 2 and doc["checked"]["params"] == len(model)
    # every model tensor, two moments and a step per parameter
    assert doc["checked"]["tensors"] == 4 * len(model)


def test_a_flipped_bit_names_the_file_and_the_tensor(copy_of):
    ckpt = copy_of("ckpt")
    data = ckpt / "step-00000200" / "rank-00000.safetensors"
    flip_byte(data, tensor_offset(data, "model/transformer.h.1.attn.c_proj.weight") + 5)
    doc = verify(str(ckpt), code=1)
    assert kinds(doc) == {
        ("checksum", "step-00000200/rank-00000.safetensors"),
        ("checksum", "step-00000200/rank-00000.safetensors[model/transformer.h.1.attn.c_proj.weight]")}
    assert verify(str(ckpt), "--step", "100", code=0)["step"] == 100  # the other step is fine


def test_truncated_and_missing_files(copy_of):
    ckpt = copy_of("ckpt")
    data = ckpt / "step-00000200" / "rank-00000.safetensors"
    data.write_bytes(data.read_bytes()[:-100])
    doc = verify(str(ckpt), code=1)
    assert any(p["kind"] == "checksum" and "bytes, the manifest records" in p["message"]
               for p in doc["problems"])
    (ckpt / "step-00000200" / "rank-00000.json").unlink()
    doc = verify(str(ckpt), code=1)
    assert ("missing", "step-00000200/rank-00000.json") in kinds(doc)


def test_fragment_record_that_lies_about_a_shape(copy_of):
    ckpt = copy_of("ckpt")
    step = ckpt / "step-00000200"
    index = json.loads((step / "rank-00000.json").read_text())
    frag = next(f for f in index["fragments"] if f["key"] == "model/transformer.wpe.weight")
    frag["shape"] = frag["global_shape"] = [POSITIONS - 1, HIDDEN]
    write_json(step / "rank-00000.json", index)
    rerecord(step, "rank-00000.json")
    doc = verify(str(ckpt), code=1)
    assert kinds(doc) == {("structure", "step-00000200/rank-00000.safetensors[model/transformer.wpe.weight]")}


# -- several ranks: DTensor regions and spec-cut plain tensors -----------------------------------

@pytest.fixture(scope="module")
def ranks_root(tmp_path_factory):
    from ucp.testing import run_ranks

    from ._ranks import save_ranks

    root = tmp_path_factory.mktemp("ranks")
    run_ranks(save_ranks, 2, args=(str(root),))  # ~10 s: two spawned ranks on gloo
    return root


def test_dtensor_regions_tile(ranks_root):
    doc = verify(str(ranks_root / "dtensor"), code=0)
    assert doc["checked"]["params"] == 2 and doc["checked"]["files"] == 4


def test_overlapping_dtensor_regions(ranks_root, tmp_path):
    import shutil

    ckpt = tmp_path / "dtensor"
    shutil.copytree(ranks_root / "dtensor", ckpt)
    step = ckpt / "step-00000001"
    from ucp.native._layout import read_manifest
    from ucp.native._load import read_rank_index
    from ucp.storage import Storage

    storage = Storage(str(ckpt))  # rank 1's index whole (saved as a member of rank 0's layout)
    index = read_rank_index(storage, read_manifest(storage, 1), 1).to_dict()
    frag = next(f for f in index["fragments"] if f["key"] == "model/w")
    assert frag["offsets"] == [3, 0]
    frag["offsets"] = [2, 0]  # overlaps rank 0's rows 0..2, and row 5 is nobody's
    write_json(step / "rank-00001.json", index)
    rerecord(step, "rank-00001.json")
    doc = verify(str(ckpt), code=1)
    assert kinds(doc) == {("coverage", "w (param)")}
    assert "overlap" in doc["problems"][0]["message"]


def test_plain_tensors_checked_against_the_manifest_spec(ranks_root):
    doc = verify(str(ranks_root / "megatron"), code=0)
    assert "spec: the one recorded in the manifest" in doc["notes"]
    assert doc["checked"]["params"] == len(gpt2_state()) - 1
    doc = verify(str(ranks_root / "missing"), code=1)
    assert kinds(doc) == {("coverage", "transformer.h.0.mlp.c_fc.weight (param)")}
    assert doc["problems"][0]["message"].startswith("rank 1 holds a piece of it under the spec")
    doc = verify(str(ranks_root / "badshape"), code=1)
    assert ("shape", "transformer.h.0.mlp.c_fc.weight (param)") in kinds(doc)


def test_plain_shards_without_a_spec_are_not_replicas(ranks_root, tmp_path):
    doc = verify(str(ranks_root / "nospec"), code=1)
    where = {w for k, w in kinds(doc) if k == "coverage"}
    assert "transformer.h.0.attn.c_attn.weight (param)" in where  # cut over tp: copies differ
    assert "transformer.h.0.ln_1.weight (param)" not in where  # replicated: identical copies
    assert all("pass --spec" in p["message"] for p in doc["problems"])
    spec = tmp_path / "gpt2_small.ucl"
    spec.write_text(small_gpt2_spec())
    verify(str(ranks_root / "nospec"), "--spec", str(spec), code=0)
    doc = verify(str(ranks_root / "nospec"), "--spec", "gpt2", code=1)  # default sizes: wrong
    assert {k for k, _ in kinds(doc)} <= {"spec", "shape", "coverage"}


# -- universal, engines, safetensors --------------------------------------------------------------

def test_universal_ok_and_a_corrupt_chunk(copy_of):
    u = copy_of("universal")
    doc = verify(str(u), code=0)
    assert doc["checked"]["chunks"] == doc["checked"]["tensors"] > 0
    chunk = next((u / "params" / "transformer.h.0.mlp.c_fc.weight" / "exp_avg").glob("c.*.*"))
    flip_byte(chunk, 17)
    doc = verify(str(u), code=1)
    assert kinds(doc) == {("checksum", "transformer.h.0.mlp.c_fc.weight (exp_avg)")}


def test_universal_shapes_against_a_spec(sample, tmp_path):
    spec = tmp_path / "gpt2_small.ucl"
    spec.write_text(small_gpt2_spec())
    verify(str(sample / "universal"), "--spec", str(spec), code=0)
    doc = verify(str(sample / "universal"), "--spec", "gpt2", code=1)  # 50257 rows expected
    assert {p["kind"] for p in doc["problems"]} == {"spec"}
    assert any(p["where"] == "transformer.wte.weight" for p in doc["problems"])


def test_deepspeed_and_dcp(deepspeed_ckpt, dcp_ckpt):
    doc = verify(str(deepspeed_ckpt.root), code=0)
    assert doc["format"] == "deepspeed" and doc["checked"]["params"] == 4
    doc = verify(str(dcp_ckpt[0]), code=0)
    assert doc["format"] == "dcp" and doc["checked"]["params"] == 4


def test_safetensors_index_that_names_a_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00001.safetensors")
    index = {"metadata": {"total_size": 8}, "weight_map": {
        "a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    doc = verify(str(tmp_path), code=1)
    assert kinds(doc) == {("missing", "model.safetensors.index.json")}


def test_text_output_lists_problems(copy_of):
    ckpt = copy_of("ckpt")
    data = ckpt / "step-00000200" / "rank-00000.safetensors"
    flip_byte(data, tensor_offset(data, "optim/state/lm_head.weight/exp_avg"))
    r = CliRunner().invoke(main, ["verify", str(ckpt)])
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines[0].startswith("checksum: step-00000200/rank-00000.safetensors: CRC32C ")
    assert lines[1].startswith("checksum: step-00000200/rank-00000.safetensors[optim/state/"
                               "lm_head.weight/exp_avg]: CRC32C ")
    assert lines[-1].endswith("2 problem(s)")
    assert r.stderr == f"Error: {ckpt}: 2 problem(s) found\n"


def test_a_huge_shape_in_tiny_chunks_is_reported_not_walked(tmp_path):
    """A sealed table and array metadata claiming 2^62 elements in 12-byte chunks: verify names
    the damaged metadata at once (it used to walk 10^18 chunk rows, a hang)."""
    import subprocess
    import sys

    import ucp
    from ucp.native._meta import seal

    ucp.save({"w": torch.ones(3)}, tmp_path / "n", step=1).wait()
    ucp.convert(str(tmp_path / "n"), str(tmp_path / "u"))
    array_meta = tmp_path / "u" / "params" / "w" / "fp32" / "zarr.json"
    meta = json.loads(array_meta.read_text())
    meta["shape"] = [2**62]
    raw = json.dumps(meta).encode()
    array_meta.write_bytes(raw)
    group = json.loads((tmp_path / "u" / "zarr.json").read_text())
    table = group["attributes"]["ucp"]
    table["params"]["w"]["shape"] = [2**62]
    table["params"]["w"]["meta_crc32c"]["fp32"] = crc32c.crc32c(raw)
    group["attributes"]["ucp"] = seal(table)
    (tmp_path / "u" / "zarr.json").write_text(json.dumps(group))
    code = ("from click.testing import CliRunner; from ucp.cli import main; import sys; "
            f"r = CliRunner().invoke(main, ['verify', '--json', {str(tmp_path / 'u')!r}]); "
            "print(r.exit_code); print(r.stdout)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    code, doc = out.split("\n", 1)
    problems = json.loads(doc)["problems"]
    assert code == "1" and len(problems) == 1 and problems[0]["kind"] == "structure", problems
    assert "chunks of 12 bytes is not how ucp chunks an array" in problems[0]["message"]


def test_deep_verify_of_an_array_over_64_mib(tmp_path):
    """An array large enough for the missing-last-file check (over 64 MiB) spans several shard
    files: the check looked for the file of its last *inner chunk* index (``c.31.7``) and reported a
    healthy checkpoint as damaged."""
    import ucp

    w = torch.arange(4200 * 4096, dtype=torch.float32).reshape(4200, 4096)  # 68.8 MB
    ucp.save({"model": {"w": w}}, str(tmp_path / "native"), step=1).wait()
    ucp.convert(str(tmp_path / "native"), str(tmp_path / "u"), progress=False)
    doc = verify(str(tmp_path / "u"), "--deep", code=0)
    assert doc["problems"] == [] and doc["checked"]["bytes"] >= w.numel() * 4
