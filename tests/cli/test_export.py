"""ucp export: Hugging Face safetensors, sharded with an index, names through the spec."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

import ucp
from ucp.cli import main

from ._sample import RENAME_SPEC, engine_state, gpt2_state, save_native

SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def load_export(path) -> dict[str, torch.Tensor]:
    """Every tensor of an export, checking the index against the shard files."""
    files = sorted(p.name for p in path.iterdir() if p.name.endswith(".safetensors"))
    if files == ["model.safetensors"]:
        assert not (path / "model.safetensors.index.json").exists()
        return load_file(path / "model.safetensors")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    n = len(files)
    assert [SHARD.match(f).groups() for f in files] == [(f"{i:05d}", f"{n:05d}") for i in range(1, n + 1)]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(path / f), framework="pt") as st:
            assert st.metadata() == {"format": "pt"}
            for k in st.keys():
                assert index["weight_map"][k] == f
                out[k] = st.get_tensor(k)
    assert set(index["weight_map"]) == set(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want) or sorted(got) == sorted(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


def test_single_file(sample, tmp_path):
    out = run("export", str(sample / "universal"), str(tmp_path / "hf")).stdout
    kib = sum(t.numel() * 4 for t in gpt2_state().values()) / 1024
    assert out == f"wrote {tmp_path / 'hf'}: {len(gpt2_state())} tensors, {kib:.1f} KiB in 1 shard(s)\n"
    assert_same(load_export(tmp_path / "hf"), gpt2_state())


def test_shards_respect_the_limit(sample, tmp_path):
    limit = 8_000
    run("export", str(sample / "universal"), str(tmp_path / "hf"), "--max-shard-size", "8KB")
    got = load_export(tmp_path / "hf")
    assert_same(got, gpt2_state())
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 3
    for f in shards:
        with safe_open(str(f), framework="pt") as st:
            sizes = [st.get_tensor(k).numel() * 4 for k in st.keys()]
        assert sum(sizes) <= limit or len(sizes) == 1, f.name


def test_dtype_and_overwrite(sample, tmp_path):
    hf = tmp_path / "hf"
    run("export", str(sample / "universal"), str(hf), "--max-shard-size", "30KB")
    r = run("export", str(sample / "universal"), str(hf), "--dtype", "bf16", code=1)
    assert r.stderr.startswith("Error: ") and "--overwrite" in r.stderr and r.stderr.count("\n") == 1
    run("export", str(sample / "universal"), str(hf), "--dtype", "bf16", "--overwrite")
    assert sorted(p.name for p in hf.iterdir()) == ["model.safetensors"]  # stale shards gone
    want = {k: v.to(torch.bfloat16) for k, v in gpt2_state().items()}
    assert_same(load_export(hf), want)


def test_straight_from_a_native_checkpoint(sample, tmp_path):
    run("export", str(sample / "ckpt"), str(tmp_path / "hf"), "--step", "100", "--dtype", "fp16")
    assert_same(load_export(tmp_path / "hf"), {k: v.half() for k, v in gpt2_state().items()})


@pytest.mark.parametrize("via_universal", [True, False])
def test_names_go_through_the_spec_renames(tmp_path, via_universal):
    spec = tmp_path / "megatron_gpt2.ucl"
    spec.write_text(RENAME_SPEC)
    src = save_native(tmp_path / "megatron", engine_state(gpt2_state()), steps=(1,),
                      topology="dp=1")
    if via_universal:  # converted without the spec: the universal checkpoint keeps engine names
        ucp.convert(str(src), str(tmp_path / "universal"))
        src = tmp_path / "universal"
        assert "layers.0.attention.qkv.weight" in ucp.open(str(src)).names()
    out = run("export", str(src), str(tmp_path / "hf"), "--spec", str(spec)).stdout
    n = len(gpt2_state())
    # a native source opened with the spec already has canonical names: nothing left to rename
    renamed = f", {n} renamed by the spec" if via_universal else ""
    assert out.startswith(f"wrote {tmp_path / 'hf'}: {n} tensors{renamed}, ")
    assert_same(load_export(tmp_path / "hf"), gpt2_state())


def test_deepspeed_source_keeps_buffers_and_model_dtype(deepspeed_ckpt, tmp_path):
    run("export", str(deepspeed_ckpt.root), str(tmp_path / "hf"))
    got = load_export(tmp_path / "hf")
    want = {n: s["param"] for n, s in deepspeed_ckpt.expected.items()}
    assert_same(got, {**want, **deepspeed_ckpt.buffers})


def test_to_s3(sample, s3_url):
    import s3fs

    url, opts = s3_url
    endpoint = opts["client_kwargs"]["endpoint_url"]
    run("export", str(sample / "universal"), f"{url}/hf", "--max-shard-size", "10KB",
        "-o", f"key={opts['key']}", "-o", f"secret={opts['secret']}",
        "-o", f"client_kwargs.endpoint_url={endpoint}")
    fs = s3fs.S3FileSystem(**opts)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{url}/hf"))
    assert names[-1] == "model.safetensors.index.json" and not any("partial" in n for n in names)
    index = json.loads(fs.cat(f"{url}/hf/model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(gpt2_state())


@pytest.mark.parametrize("args", [["--max-shard-size", "lots"], ["--max-shard-size", "0"],
                                  ["--dtype", "int8"]])
def test_bad_options_are_usage_errors(sample, tmp_path, args):
    r = run("export", str(sample / "universal"), str(tmp_path / "hf"), *args, code=2)
    assert "Error: Invalid value" in r.stderr and not (tmp_path / "hf").exists()


def test_transformers_loads_the_export_offline(sample, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = tmp_path / "hf"
    run("export", str(sample / "universal"), str(hf), "--max-shard-size", "30KB",
        "--config", str(sample / "config.json"))
    assert (hf / "model.safetensors.index.json").exists() and (hf / "config.json").exists()
    model = transformers.GPT2LMHeadModel.from_pretrained(str(hf), local_files_only=True)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_pretrained(str(hf)))
    reference.load_state_dict(gpt2_state())
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight,
                       gpt2_state()["transformer.h.1.mlp.c_fc.weight"])


def test_memory_stays_at_about_one_tensor(tmp_path):
    """Peak traced memory while exporting 8 tensors of 2 MiB each stays near one tensor."""
    import tracemalloc

    big = {f"layer{i}.weight": torch.full((512, 1024), float(i)) for i in range(8)}
    save_native(tmp_path / "ckpt", big, steps=(1,))
    ucp.convert(str(tmp_path / "ckpt"), str(tmp_path / "universal"))
    tracemalloc.start()
    try:
        run("export", str(tmp_path / "universal"), str(tmp_path / "hf"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tensor = 512 * 1024 * 4
    assert peak < 2.5 * tensor, f"peak {peak / 2**20:.1f} MiB for {8 * tensor / 2**20:.0f} MiB"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as st:
        assert float(st.get_tensor("layer7.weight")[3, 5]) == 7.0


def test_a_cut_short_export_is_refused_by_every_reader(sample, tmp_path):
    hf = tmp_path / "hf"
    run("export", str(sample / "universal"), str(hf), "--max-shard-size", "8KB")
    shards = sorted(hf.glob("model-*.safetensors"))
    (hf / "model.safetensors.index.json").unlink()  # killed after some shards: no index yet
    for f in shards[2:]:
        f.unlink()
    for cmd in ("inspect", "verify"):
        r = run(cmd, str(hf), code=1)
        assert f"{len(shards) - 2} of its {len(shards)} shards are missing" in r.output and \
            shards[2].name in r.output, r.output
    r = run("export", str(hf), str(tmp_path / "again"), code=1)
    assert "interrupted export" in r.stderr and not (tmp_path / "again").exists()


def test_a_failed_overwrite_keeps_the_earlier_export(sample, tmp_path, monkeypatch):
    import errno

    from ucp.ops import _export

    hf = tmp_path / "hf"
    run("export", str(sample / "universal"), str(hf), "--max-shard-size", "8KB")
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    real, calls = _export._read, []

    def disk_full(opened, item):
        calls.append(item)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(opened, item)
    monkeypatch.setattr(_export, "_read", disk_full)
    r = run("export", str(sample / "universal"), str(hf), "--dtype", "bf16", "--overwrite", code=1)
    assert re.search(r"Error: writing .*hf/model(-\d{5}-of-\d{5})?\.safetensors failed: .*No space left", r.stderr), r.stderr
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before  # whole, and no temporaries
