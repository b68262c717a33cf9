"""The DCP reader against real torch.distributed.checkpoint saves, and against bad input.

The real checkpoints come from ``_dcp_make.py`` on a gloo group (FSDP2 and tensor parallel on 2 ranks,
FSDP2 x TP on 4); each is compared bit for bit with the full state dict torch itself gathers. The
bad-input tests save small checkpoints in this process (``dcp.save`` needs no process group).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ucp.core._errors import CheckpointNotFoundError, ConvertError, CorruptCheckpointError, UnsafeInputError
from ucp.engines._base import SourceCheckpoint
from ucp.engines.dcp._reader import DcpCheckpoint, detect


def _load_helper(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make = _load_helper("_dcp_make")
synth = _load_helper("_dcp_synth")

# Saving in this process (no process group) is what the small tests mean to do.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


# -- real checkpoints --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dcp_real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ucp.testing import run_ranks

    out = tmp_path_factory.mktemp("dcp-real")
    run_ranks(make.make_checkpoints, 2, args=(str(out), ["fsdp2", "tp"]))
    return out


@pytest.fixture(scope="module")
def dcp_real_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ucp.testing import run_ranks

    out = tmp_path_factory.mktemp("dcp-2d")
    run_ranks(make.make_checkpoints, 4, args=(str(out), ["fsdp2_tp"]))
    return out


def _jsonable(v: Any) -> Any:
    return [_jsonable(x) for x in v] if isinstance(v, (tuple, list)) else v


def _check_against_full(ckpt: DcpCheckpoint, full: dict[str, Any], *, frozen: set[str]) -> int:
    """Every parameter, optimizer state, buffer, group and the step equal torch's full state dict."""
    model, optim = full["model"], full["optim"]
    assert set(ckpt.names()) | set(ckpt.buffers()) == set(model)
    assert set(ckpt.buffers()) == {"mask", "logit_scale"}
    compared = 0
    for name in ckpt.names():
        info = ckpt.info(name)
        assert info.shape == tuple(model[name].shape) and info.dtype == model[name].dtype
        expected = {k: v for k, v in optim["state"].get(name, {}).items() if k != "step"}
        assert set(info.states) == {"param", "fp32", *expected}, name
        assert info.frozen == (name in frozen), name
        for state in info.states:
            got = ckpt.read(name, state)
            want = model[name] if state in ("param", "fp32") else expected[state]
            assert got.dtype == want.dtype and torch.equal(got, want), (name, state)
            compared += 1
    for name, value in ckpt.buffers().items():
        assert torch.equal(value, model[name]), name
    steps = {int(s["step"]) for s in optim["state"].values()}
    assert ckpt.step == max(steps)
    groups = ckpt.param_groups()
    assert len(groups) == len(optim["param_groups"])
    for index, group in enumerate(optim["param_groups"]):
        assert groups[index] == {k: _jsonable(v) for k, v in group.items() if k != "params"}
        for name in group["params"]:
            assert ckpt.info(name).group == index, name
    return compared


@pytest.mark.parametrize("case, directory, frozen", [
    ("fsdp2", "ckpt", {"wpe"}),           # frozen and sharded, in no param group
    ("fsdp2", "ckpt_per_rank", {"wpe"}),  # saved without collectives: __<rank>.metadata files
    ("tp", "ckpt", {"wpe"}),              # frozen, replicated, listed in a param group; flattened optim
])
def test_real_checkpoint_equals_torch_full_state(dcp_real: Path, case: str, directory: str, frozen: set[str]) -> None:
    ckpt = DcpCheckpoint(dcp_real / case / directory)
    assert isinstance(ckpt, SourceCheckpoint) and ckpt.engine == "dcp" and ckpt.ranks == 2
    full = torch.load(dcp_real / case / "full.pt", weights_only=True)
    assert _check_against_full(ckpt, full, frozen=frozen) > 100


@pytest.mark.slow  # 4 ranks on a gloo group: about 20 s on 2 cores
def test_real_2d_fsdp2_tp_checkpoint(dcp_real_2d: Path) -> None:
    ckpt = DcpCheckpoint(dcp_real_2d / "fsdp2_tp" / "ckpt")
    full = torch.load(dcp_real_2d / "fsdp2_tp" / "full.pt", weights_only=True)
    assert ckpt.ranks == 4
    assert len(ckpt.metadata.tensors["model.layers.0.q.weight"].chunks) == 4
    _check_against_full(ckpt, full, frozen={"wpe"})


def test_group_membership_and_sharding(dcp_real: Path) -> None:
    fsdp, tp = DcpCheckpoint(dcp_real / "fsdp2" / "ckpt"), DcpCheckpoint(dcp_real / "tp" / "ckpt")
    assert fsdp.info("wpe").group is None and tp.info("wpe").group == 0
    assert fsdp.info("layers.0.q.weight").group == 0 and fsdp.info("ln_f.bias").group == 1
    # uneven shards: 53 vocabulary rows over 2 ranks; TP row-parallel splits dim 1.
    assert [c.sizes for c in tp.metadata.tensors["model.wte.weight"].chunks] == [(27, 24), (26, 24)]
    assert {c.offsets for c in tp.metadata.tensors["model.layers.0.proj.weight"].chunks} == {(0, 0), (0, 12)}


def test_read_touches_only_that_tensors_byte_ranges(dcp_real: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = DcpCheckpoint(dcp_real / "tp" / "ckpt")
    reads: list[tuple[str, int, int]] = []
    original = ckpt.storage.read_range
    monkeypatch.setattr(ckpt.storage, "read_range",
                        lambda rel, start, end: reads.append((rel, start, end)) or original(rel, start, end))
    entry = ckpt.metadata.tensors["optim.state.layers.1.fc.weight.exp_avg"]
    ckpt.read("layers.1.fc.weight", "exp_avg")
    assert sorted(reads) == sorted((c.file, c.start, c.start + c.length) for c in entry.chunks)


def test_reads_through_fsspec_memory_url(dcp_real: Path) -> None:
    url = "memory://ucp-dcp-test/ckpt"
    fsspec.filesystem("memory").put(str(dcp_real / "fsdp2" / "ckpt"), "/ucp-dcp-test/ckpt", recursive=True)
    try:
        full = torch.load(dcp_real / "fsdp2" / "full.pt", weights_only=True)
        _check_against_full(DcpCheckpoint(url), full, frozen={"wpe"})
        assert detect(url) is not None
    finally:
        fsspec.filesystem("memory").rm("/ucp-dcp-test", recursive=True)


def test_reads_from_s3(dcp_real: Path, s3_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_url
    fs = fsspec.filesystem("s3", **options)
    for f in os.listdir(dcp_real / "tp" / "ckpt"):
        fs.put_file(str(dcp_real / "tp" / "ckpt" / f), f"{url[len('s3://'):]}/{f}")
    full = torch.load(dcp_real / "tp" / "full.pt", weights_only=True)
    _check_against_full(DcpCheckpoint(url, storage_options=options), full, frozen={"wpe"})


# -- small in-process checkpoints --------------------------------------------------------------
def _tiny(path: Path, *, dtype: torch.dtype = torch.float32, optim_key: str | None = "optim") -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4, dtype=dtype)).sum().backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd} if optim_key is None else {"model": model_sd, optim_key: optim_sd}
    dcp.save(state, checkpoint_id=str(path))
    return path


def test_bf16_model_with_optimizer_key_and_sgd(tmp_path: Path) -> None:
    ckpt = DcpCheckpoint(_tiny(tmp_path / "c", dtype=torch.bfloat16, optim_key="optimizer"))
    assert ckpt.names() == ["0.weight", "0.bias", "1.weight", "1.bias"]
    info = ckpt.info("0.weight")
    assert info.dtype == torch.bfloat16 and info.states == ("param", "momentum_buffer")
    assert ckpt.read("0.weight", "momentum_buffer").dtype == torch.bfloat16
    assert ckpt.step is None  # SGD keeps no step
    assert ckpt.param_groups()[0]["momentum"] == 0.9
    with pytest.raises(ConvertError, match="no fp32 copy"):
        ckpt.read("0.weight")
    with pytest.raises(KeyError, match="nope"):
        ckpt.info("nope")


def test_model_only_checkpoint_and_bare_state_dict(tmp_path: Path) -> None:
    ckpt = DcpCheckpoint(_tiny(tmp_path / "c", optim_key=None))
    assert len(ckpt.names()) == 4 and ckpt.buffers() == {} and ckpt.param_groups() == []
    assert ckpt.info("0.bias").states == ("param", "fp32") and not ckpt.info("0.bias").frozen
    weights = {"layer.weight": torch.arange(6.0).view(2, 3), "step": 7}
    dcp.save(weights, checkpoint_id=str(tmp_path / "bare"))
    bare = DcpCheckpoint(tmp_path / "bare")
    assert bare.names() == ["layer.weight"] and bare.step == 7
    assert torch.equal(bare.read("layer.weight", "param"), weights["layer.weight"])


def test_explicit_keys(tmp_path: Path) -> None:
    path = _tiny(tmp_path / "c")
    assert DcpCheckpoint(path, model_key="model", optim_key="optim").info("0.weight").group == 0
    with pytest.raises(ConvertError, match="no top-level key 'weights'"):
        DcpCheckpoint(path, model_key="weights")


def test_missing_metadata_and_data_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"\.metadata: not found"):
        DcpCheckpoint(tmp_path)
    path = _tiny(tmp_path / "c")
    (path / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointNotFoundError, match="missing data file.*__0_0.distcp"):
        DcpCheckpoint(path)


def test_truncated_data_file(tmp_path: Path) -> None:
    path = _tiny(tmp_path / "c")
    data = (path / "__0_0.distcp").read_bytes()
    (path / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"__0_0\.distcp: truncated"):
        DcpCheckpoint(path)


def test_damaged_blob_names_file_and_key(tmp_path: Path) -> None:
    path = _tiny(tmp_path / "c")
    ckpt = DcpCheckpoint(path)
    chunk = ckpt.metadata.tensors["model.0.weight"].chunks[0]
    with open(path / chunk.file, "r+b") as f:  # wipe the blob's zip directory, keep its length
        f.seek(chunk.start + chunk.length - 200)
        f.write(b"\0" * 200)
    with pytest.raises(CorruptCheckpointError, match=r"__0_0\.distcp: 'model\.0\.weight'.*damaged"):
        DcpCheckpoint(path).read("0.weight")


class _Payload:
    """Unpickling this calls ``os.makedirs(marker)``: a harmless stand-in for running code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (self.marker,))


def _rewrite_metadata(path: Path, edit: Any) -> None:
    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own file, written a moment ago by dcp.save
    edit(md)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


@pytest.mark.parametrize("where", ["top", "nested"])
def test_hostile_metadata_pickle_is_refused_without_running(tmp_path: Path, where: str) -> None:
    path = _tiny(tmp_path / "c")
    marker = tmp_path / "pwned"
    if where == "top":
        (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    else:
        _rewrite_metadata(path, lambda md: setattr(md, "planner_data", _Payload(marker)))
    with pytest.raises(UnsafeInputError, match=r"refusing to unpickle (os|posix)\.makedirs"):
        DcpCheckpoint(path)
    assert not marker.exists()


def test_hostile_value_blob_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = {"model": {"w": torch.ones(2)},
             "optim": {"state": {}, "param_groups": [{"lr": _Payload(marker), "params": ["w"]}]}}
    dcp.save(state, checkpoint_id=str(tmp_path / "c"))
    assert not marker.exists()
    with pytest.raises(UnsafeInputError, match=r"'optim\.param_groups\.0\.lr'.*refusing to run code"):
        DcpCheckpoint(tmp_path / "c")
    assert not marker.exists()
    # The explicit opt-out really unpickles (and so runs the payload): it is for trusted files only.
    assert DcpCheckpoint(tmp_path / "c", allow_unsafe_pickle=True).param_groups() == [{"lr": None}]
    assert marker.exists()


def test_malformed_metadata(tmp_path: Path) -> None:
    path = _tiny(tmp_path / "c")
    (path / ".metadata").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata: not a readable DCP metadata pickle"):
        DcpCheckpoint(path)
    (path / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    with pytest.raises(CorruptCheckpointError, match="not DCP Metadata"):
        DcpCheckpoint(path)


def test_newer_format_version_is_named(tmp_path: Path) -> None:
    path = _tiny(tmp_path / "c")
    _rewrite_metadata(path, lambda md: setattr(md, "version", "2.0.0"))
    with pytest.raises(CorruptCheckpointError, match="format version '2.0.0'"):
        DcpCheckpoint(path)


def test_data_path_outside_directory_is_refused(tmp_path: Path) -> None:
    path = _tiny(tmp_path / "c")

    def escape(md: Any) -> None:
        for info in md.storage_data.values():
            info.relative_path = "../outside.distcp"
    _rewrite_metadata(path, escape)
    with pytest.raises(UnsafeInputError, match="outside the checkpoint"):
        DcpCheckpoint(path)


def test_overlapping_chunks_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "c"
    dcp.save({"model": {"w": torch.arange(8.0)}}, checkpoint_id=str(path))

    def overlap(md: Any) -> None:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

        tmd = md.state_dict_metadata["model.w"]
        tmd.chunks.append(ChunkStorageMetadata(offsets=torch.Size([4]), sizes=torch.Size([4])))
        tmd.chunks[0].sizes = torch.Size([6])
        md.storage_data[MetadataIndex("model.w", [4])] = md.storage_data[MetadataIndex("model.w", [0])]
    _rewrite_metadata(path, overlap)
    with pytest.raises(CorruptCheckpointError, match=r"'model\.w'.*overlap"):
        DcpCheckpoint(path).read("w", "param")


@pytest.mark.parametrize("descriptor, message", [("stream.rot13/1", "does not know"),
                                                 ("stream.zstd/1", "zstd")])
def test_stream_transforms(tmp_path: Path, descriptor: str, message: str) -> None:
    path = _tiny(tmp_path / "c")

    def transform(md: Any) -> None:
        for info in md.storage_data.values():
            info.transform_descriptors = [descriptor]
    _rewrite_metadata(path, transform)
    if descriptor.startswith("stream.zstd") and importlib.util.find_spec("zstandard") is not None:
        message = "damaged|not a torch.save"  # decompressing plain bytes fails
    with pytest.raises((ConvertError, CorruptCheckpointError), match=message):
        DcpCheckpoint(path)


def test_zstd_compressed_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("zstandard")
    from torch.distributed.checkpoint._extension import ZStandard

    weights = {"model": {"w": torch.randn(5, 3)}}
    dcp.save(weights, storage_writer=dcp.FileSystemWriter(str(tmp_path / "c"), _extensions=[ZStandard()]))
    assert torch.equal(DcpCheckpoint(tmp_path / "c").read("w", "param"), weights["model"]["w"])


def test_unknown_state_and_detect(tmp_path: Path) -> None:
    path = _tiny(tmp_path / "c")
    with pytest.raises(ConvertError, match="has no state 'exp_avg'.*momentum_buffer"):
        DcpCheckpoint(path).read("0.weight", "exp_avg")
    assert "1 .distcp" in (detect(path) or "")
    (tmp_path / "empty").mkdir()
    assert detect(tmp_path / "empty") is None


# -- cut -> consolidate, for any grid of chunks ------------------------------------------------
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]


@st.composite
def _tilings(draw: st.DrawFn) -> tuple[torch.Tensor, list, list[int]]:
    shape = draw(st.lists(st.integers(1, 6), max_size=3))
    cuts = [draw(st.lists(st.integers(1, n - 1), max_size=2)) if n > 1 else [] for n in shape]
    dtype = draw(st.sampled_from(_DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tensor = (torch.randn(shape, generator=gen) * 100).to(dtype)
    chunks = draw(st.permutations(synth.grid_chunks(shape, cuts)))
    files = draw(st.lists(st.integers(0, 3), min_size=len(chunks), max_size=len(chunks)))
    return tensor, list(chunks), files


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_tilings())
def test_any_tiling_consolidates_bit_exactly(tiling: tuple[torch.Tensor, list, list[int]]) -> None:
    import tempfile

    tensor, chunks, files = tiling
    with tempfile.TemporaryDirectory() as tmp:
        synth.write_tiled(tmp, "model.w", tensor, chunks, files)
        got = DcpCheckpoint(tmp).read("w", "param")
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)
        if len(chunks) > 1:  # one chunk fewer no longer tiles the tensor
            synth.write_tiled(tmp, "model.w", tensor, chunks[1:], files[1:])
            with pytest.raises(CorruptCheckpointError, match="elements"):
                DcpCheckpoint(tmp).read("w", "param")


def test_synthetic_layout_is_what_torch_loads(tmp_path: Path) -> None:
    tensor = torch.arange(30.0).view(5, 6)
    synth.write_tiled(str(tmp_path), "model.w", tensor, synth.grid_chunks((5, 6), [[2], [1, 4]]), [0, 1, 2, 0, 1, 2])
    loaded = {"model": {"w": torch.zeros(5, 6)}}
    dcp.load(loaded, checkpoint_id=str(tmp_path))
    assert torch.equal(loaded["model"]["w"], tensor)
    assert torch.equal(DcpCheckpoint(tmp_path).read("w", "param"), tensor)


# -- through `ucp convert` ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["fsdp2", "tp"])
def test_convert_detects_dcp_and_equals_torch_full_state(dcp_real: Path, tmp_path: Path, case: str) -> None:
    import ucp

    ckpt = ucp.convert(str(dcp_real / case / "ckpt"), str(tmp_path / "u"), engine="auto", workers=2)
    full = torch.load(dcp_real / case / "full.pt", weights_only=True)
    model, optim = full["model"], full["optim"]
    assert ckpt.engine == "dcp" and ckpt.step == max(int(s["step"]) for s in optim["state"].values())
    assert set(ckpt.names()) | set(ckpt.buffer_names()) == set(model)
    for name in ckpt.names():
        assert torch.equal(ckpt.read(name, "param"), model[name]), name
        for state, want in optim["state"].get(name, {}).items():
            if state != "step":
                assert torch.equal(ckpt.read(name, state), want), (name, state)
    for name in ckpt.buffer_names():
        assert torch.equal(ckpt.read_buffer(name), model[name]), name
    assert len(ckpt.param_groups) == len(optim["param_groups"])
