"""Save -> load is a bijection; async snapshots; bad input is rejected before any I/O."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import ucp
from ucp import CheckpointExistsError, CheckpointNotFoundError, ChecksumError, StateError


def assert_same(a, b, path="state"):
    """Bit-for-bit equality of two saved structures, with exact Python types."""
    # An OrderedDict (state_dict) comes back as a plain dict with the same order.
    kind = lambda x: dict if isinstance(x, dict) else type(x)  # noqa: E731
    assert kind(a) is kind(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) \
            if a.numel() else True, path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int8, torch.uint8, torch.bool]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    n = math.prod(shape)
    raw = draw(st.binary(min_size=n * torch.empty((), dtype=dtype).element_size(),
                         max_size=n * torch.empty((), dtype=dtype).element_size()))
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if n else \
        torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:  # only 0/1 bytes are valid bools
        t = t.view(torch.uint8).bitwise_and(1).view(torch.bool) if n else t
    if draw(st.booleans()) and t.dim() == 2:
        t = t.t()  # non-contiguous
    return t


leaves = st.one_of(tensors(), st.integers(-2**62, 2**62), st.floats(allow_nan=True),
                   st.text(max_size=8), st.booleans(), st.none())
keys = st.one_of(st.text(min_size=1, max_size=6), st.integers(0, 5))
states = st.recursive(leaves, lambda c: st.one_of(st.lists(c, max_size=3),
                                                  st.tuples(c, c),
                                                  st.dictionaries(keys, c, max_size=3)),
                      max_leaves=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=st.dictionaries(keys, states, max_size=4))
def test_save_load_bijection(tmp_path_factory, state):
    url = str(tmp_path_factory.mktemp("ckpt"))
    ucp.save(state, url, step=1).wait()
    assert_same(state, ucp.load(url))


@pytest.mark.filterwarnings("ignore:ucp.save. .* keyed by integer indices")  # on purpose: they load back
def test_realistic_state_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
             "rng": torch.get_rng_state(), "step": 7, "loss": 1.25}
    ucp.save(state, tmp_path, step=7).wait()
    back = ucp.load(str(tmp_path))
    assert_same(state, back)
    opt2 = torch.optim.AdamW(model.parameters())
    opt2.load_state_dict(back["optim"])  # the optimizer accepts what comes back
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)


def test_in_place_changes_after_save_do_not_leak(tmp_path):
    w = torch.arange(1_000_000, dtype=torch.float32)
    expected = w.clone()
    handle = ucp.save({"w": w}, tmp_path, step=1)
    w.mul_(-1)  # what an optimizer step does right after save returns
    w[0] = 123.0
    handle.wait()
    assert handle.done()
    assert torch.equal(ucp.load(str(tmp_path))["w"], expected)


def test_layout_and_latest(tmp_path):
    ucp.save({"a": torch.ones(2)}, tmp_path, step=3).wait()
    step = tmp_path / "step-00000003"
    assert sorted(os.listdir(step)) == ["manifest.json", "rank-00000.json", "rank-00000.safetensors"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000003"
    from safetensors.torch import load_file
    assert torch.equal(load_file(step / "rank-00000.safetensors")["a"], torch.ones(2))


def test_bad_value_names_key_path_before_io(tmp_path):
    with pytest.raises(StateError, match=r"\['model'\]\['f'\].*object"):
        ucp.save({"model": {"w": torch.ones(1), "f": object()}}, tmp_path / "c", step=1)
    assert not (tmp_path / "c").exists()
    with pytest.raises(StateError, match="key"):
        ucp.save({(1, 2): 3}, tmp_path / "c", step=1)


def test_flipped_byte_is_detected_naming_file(tmp_path):
    ucp.save({"w": torch.randn(1000)}, tmp_path, step=1).wait()
    shard = tmp_path / "step-00000001" / "rank-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-7] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="rank-00000.safetensors"):
        ucp.load(str(tmp_path))


def test_truncated_index_is_detected(tmp_path):
    ucp.save({"w": torch.randn(10)}, tmp_path, step=1).wait()
    index = tmp_path / "step-00000001" / "rank-00000.json"
    index.write_bytes(index.read_bytes()[:-10])
    with pytest.raises(ChecksumError, match="rank-00000.json"):
        ucp.load(str(tmp_path))


def test_overwrite_requires_flag(tmp_path):
    ucp.save({"w": torch.zeros(2)}, tmp_path, step=1).wait()
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        ucp.save({"w": torch.ones(2)}, tmp_path, step=1)
    ucp.save({"w": torch.ones(2)}, tmp_path, step=1, overwrite=True).wait()
    assert torch.equal(ucp.load(str(tmp_path))["w"], torch.ones(2))


def test_keep_retention_deletes_only_older_committed(tmp_path):
    for s in (1, 2, 3, 4):
        ucp.save({"s": torch.tensor(s)}, tmp_path, step=s, keep=2).wait()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step")) == \
        ["step-00000003", "step-00000004"]
    assert int(ucp.load(str(tmp_path), step=3)["s"]) == 3


def test_load_newest_and_explicit_steps(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        ucp.load(str(tmp_path))
    for s in (5, 10):
        ucp.save({"s": s}, tmp_path, step=s).wait()
    (tmp_path / "step-00000020").mkdir()  # a partial step: no manifest
    assert ucp.load(str(tmp_path))["s"] == 10
    assert ucp.load(str(tmp_path), step=5)["s"] == 5
    with pytest.raises(CheckpointNotFoundError, match="committed steps"):
        ucp.load(str(tmp_path), step=20)


def test_unknown_protocol_names_package():
    with pytest.raises(ucp.UnsupportedProtocolError, match="gcsfs"):
        ucp.save({"a": 1}, "gs://bucket/run", step=1)


def test_memory_url(tmp_path):
    url = f"memory://ucp-{os.getpid()}-{id(tmp_path)}"
    ucp.save({"w": torch.randn(4, 4)}, url, step=2).wait()
    assert ucp.load(url)["w"].shape == (4, 4)


def test_s3_round_trip(s3_url):
    url, opts = s3_url
    state = {"w": torch.randn(64, 64).bfloat16(), "meta": {"step": 3}}
    ucp.save(state, url, step=3, storage_options=opts).wait()
    ucp.save(state, url, step=4, storage_options=opts, keep=1).wait()
    assert_same(state, ucp.load(url, storage_options=opts))
    with pytest.raises(CheckpointNotFoundError):
        ucp.load(url, step=3, storage_options=opts)


def test_an_optimizer_state_keyed_by_indices_warns_at_save_time_with_the_fix(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    with pytest.warns(UserWarning, match=r"state\['run'\]\['optim'\] is an optimizer state_dict "
                                         r"keyed by integer indices.*get_state_dict\(model, "
                                         r"optimizer\)") as caught:
        ucp.save({"run": {"optim": opt.state_dict()}}, str(tmp_path), step=1).wait()
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller's line
    model_sd, optim_sd = get_state_dict(model, opt)  # keyed by parameter names: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ucp.save({"model": model_sd, "optim": optim_sd}, str(tmp_path), step=2).wait()
