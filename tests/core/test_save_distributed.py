"""Multi-rank saves on a real gloo group: per-rank shards, DTensors, failures on any rank."""

from __future__ import annotations

import os

import pytest
import torch

import ucp
from ucp.native._layout import committed_steps
from ucp.storage import Storage


def _state(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
            "rank": rank, "step": step, "opt": {0: {"exp_avg": torch.randn(5, generator=g)}}}


def save_and_load(rank, world, url, step):
    state = _state(rank, step)
    ucp.save(state, url, step=step, topology=f"dp={world}").wait()
    back = ucp.load(url)
    ok = all(torch.equal(back[k], state[k]) for k in ("w", "b")) and back["rank"] == rank
    return ok and torch.equal(back["opt"][0]["exp_avg"], state["opt"][0]["exp_avg"])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_rank_writes_and_reads_its_own_shard(run_ranks, tmp_path, world):
    url = str(tmp_path)
    results = run_ranks(save_and_load, world, args=(url, 5))
    assert [r.value for r in results] == [True] * world
    files = sorted(os.listdir(tmp_path / "step-00000005"))
    assert files == ["manifest.json"] + sorted(
        f"rank-{r:05d}.{ext}" for r in range(world) for ext in ("json", "safetensors"))
    manifest = ucp.native._layout.read_manifest(Storage(url), 5)
    assert manifest.world_size == world and str(manifest.topology) == f"dp={world},tp=1,pp=1,zero=0"
    assert set(manifest.files) == set(files) - {"manifest.json"}
    # a single process reads any rank's state without torch.distributed
    assert ucp.load(url, rank=world - 1)["rank"] == world - 1


def dtensor_round_trip(rank, world, url):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    col = distribute_tensor(full, mesh, [Replicate(), Shard(0)])
    both = distribute_tensor(full.bfloat16(), mesh, [Shard(1), Shard(0)])
    uneven = distribute_tensor(torch.arange(7.0), mesh, [Replicate(), Shard(0)])
    ucp.save({"col": col, "both": both, "uneven": uneven}, url, step=1).wait()
    from ucp.native._load import read_rank_index
    from ucp.native._layout import read_manifest
    st = Storage(url)
    index = read_rank_index(st, read_manifest(st, 1), rank)
    regions = {f.key: (f.offsets, f.shape, f.placements) for f in index.fragments}
    out = {}
    for like in (None, {"col": col, "both": both, "uneven": uneven}):
        back = ucp.load(url, like=like)
        for k, orig in (("col", col), ("both", both), ("uneven", uneven)):
            b = back[k]
            assert type(b).__name__ == "DTensor", k
            assert b.placements == orig.placements and b.shape == orig.shape
            assert torch.equal(b.to_local(), orig.to_local())
            assert torch.equal(b.full_tensor(), orig.full_tensor())
        out["same_mesh"] = back["col"].device_mesh.mesh.tolist() == mesh.mesh.tolist()
    out["regions"] = regions
    return out


def test_dtensor_fragment_table_and_round_trip(run_ranks, tmp_path):
    results = run_ranks(dtensor_round_trip, 4, args=(str(tmp_path),))
    for r in results:
        assert r.value["same_mesh"]
        regions = r.value["regions"]
        dp, tp = divmod(r.rank, 2)
        # col: rows split over tp (4 rows each), replicated over dp
        assert regions["col"] == ((4 * tp, 0), (4, 6), ("R", "S(0)"))
        # both: columns over dp, rows over tp
        assert regions["both"] == ((4 * tp, 3 * dp), (4, 3), ("S(1)", "S(0)"))
        # uneven: 7 elements over tp=2 -> 4 + 3
        assert regions["uneven"] == ((4 * tp,), (4 - tp,), ("R", "S(0)"))


def fail_on_rank_one(rank, world, url):
    ucp.save({"w": torch.ones(3) * rank}, url, step=1).wait()
    os.environ["UCP_FAILPOINT"] = "save.write:eio"
    handle = ucp.save({"w": torch.zeros(3)}, url, step=2, timeout=60)
    try:
        handle.wait()
    except ucp.SaveError as e:
        return str(e)
    return "no error"


def test_failure_on_one_rank_raises_on_every_rank(run_ranks, tmp_path):
    results = run_ranks(fail_on_rank_one, 2, args=(str(tmp_path),),
                        env={"UCP_FAILPOINT_RANK": "1"})
    for r in results:
        assert "rank 1" in r.value and "step 2 was not committed" in r.value and "injected" in r.value
    assert committed_steps(Storage(str(tmp_path))) == [1]
    assert torch.equal(ucp.load(str(tmp_path), rank=1)["w"], torch.ones(3))


@pytest.mark.parametrize("point,victim", [("save.staging", 1), ("save.write", 1), ("save.index", 0),
                                          ("save.gather", 1), ("save.commit", 0)])
def test_sigkill_leaves_previous_checkpoint(run_ranks, tmp_path, point, victim):
    url = str(tmp_path)
    # the failpoint fires on the second save only: the first save (step 1) must commit
    env = {"UCP_FAILPOINT_RANK": str(victim)}
    results = run_ranks(_kill_second_save, 2, args=(url, point), env=env, check=False, timeout=120)
    dead, alive = results[victim], results[1 - victim]
    assert dead.exitcode == -9, dead
    assert alive.ok and alive.value != "committed", alive
    assert "did not" in alive.value  # a coordination timeout naming what happened
    if point != "save.commit":
        assert f"[{victim}]" in alive.value
    st = Storage(url)
    assert committed_steps(st) == [1]
    for rank in (0, 1):
        assert torch.equal(ucp.load(url, rank=rank)["w"], torch.full((1000,), 1.0 + rank))
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"


def _kill_second_save(rank, world, url, point):
    ucp.save({"w": torch.full((1000,), 1.0 + rank)}, url, step=1).wait()
    os.environ["UCP_FAILPOINT"] = f"{point}:kill"
    try:
        ucp.save({"w": torch.full((1000,), 2.0 + rank)}, url, step=2, timeout=6).wait()
    except ucp.SaveError as e:
        return str(e)
    return "committed"


def s3_ranks(rank, world, url, opts):
    state = _state(rank, 3)
    ucp.save(state, url, step=3, storage_options=opts).wait()
    return torch.equal(ucp.load(url, storage_options=opts)["w"], state["w"])


def test_two_ranks_on_s3(run_ranks, s3_url):
    url, opts = s3_url
    assert [r.value for r in run_ranks(s3_ranks, 2, args=(url, opts))] == [True, True]


def _rank_one_never_saves(rank, world, url):
    if rank == 1:
        return None  # gone before ucp's first save creates its coordination group
    try:
        ucp.save(_state(rank, 1), url, step=1, timeout=3.0).wait()
    except ucp.SaveError as e:
        return f"{type(e).__name__}: {e}"
    return "saved"


def test_a_rank_gone_before_the_first_save_is_a_save_error(run_ranks, tmp_path):
    """A rank that dies before the first save (a SIGKILL during start-up on a loaded machine) left
    the other with torch's bare ``RuntimeError: Wait timeout`` from creating the group."""
    results = run_ranks(_rank_one_never_saves, 2, args=(str(tmp_path),), check=False, timeout=120)
    msg = results[0].value
    assert msg is not None, results[0].error
    assert msg.startswith("CoordinationTimeoutError: creating ucp's coordination group") and "2 ranks" in msg
    assert committed_steps(Storage(str(tmp_path))) == []
