"""`ucp convert` on real DeepSpeed checkpoints equals DeepSpeed's own tools, bit for bit."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import ucp
from ucp.cli import main
from ucp.engines.deepspeed._files import ALLOWED_GLOBALS


def _trusted(path):
    with torch.serialization.safe_globals([(cls, name) for name, cls in ALLOWED_GLOBALS.items()]):
        return torch.load(path, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["z1_fp32_dp2", "z2_bf16_dp2", "z3_bf16_dp2", "z2_bf16_dp3"])
def test_convert_equals_zero_to_fp32_and_ds_to_universal(ds_checkpoint, ds_universal, ds_train_module,
                                                         tmp_path, key):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    src, args = ds_checkpoint(key)
    res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "u"), "-q", "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert f"ZeRO-{args.stage}" in res.stderr and "found deepspeed" in res.stderr
    ckpt = ucp.open(str(tmp_path / "u"))
    assert ckpt.engine == "deepspeed" and ckpt.step == args.steps
    assert str(ckpt.topology).startswith(f"dp={key[-1]},tp=1,pp=1")
    ref = get_fp32_state_dict_from_zero_checkpoint(str(src))
    for name, want in ref.items():
        if name in ckpt.buffer_names():
            continue
        name = ckpt.aliases.get(name, name)
        state = "param" if ckpt.info(name).frozen else "fp32"
        assert torch.equal(ckpt.read(name, state).float(), want), name
    zero = ds_universal(key)
    for name in ckpt.names():
        info = ckpt.info(name)
        if info.frozen:
            continue
        for state in ("exp_avg", "exp_avg_sq"):
            want = _trusted(zero / name / f"{state}.pt")
            want = want["param"] if isinstance(want, dict) else want
            assert torch.equal(ckpt.read(name, state), want.view(info.shape)), (name, state)
    # frozen parameters and buffers are kept (DeepSpeed's own universal format drops them)
    model = ds_train_module.build_model(args)
    wpe = ckpt.info("wpe")
    assert wpe.frozen and torch.equal(ckpt.read("wpe", "param"), model.wpe.detach().to(wpe.dtype))
    assert sorted(ckpt.buffer_names()) == sorted(n for n, _ in model.named_buffers())
    for name, want in model.named_buffers():
        assert torch.equal(ckpt.read_buffer(name).to(want.dtype), want), name
    if args.tie:
        assert ckpt.aliases == {"head.weight": "wte.weight"}
    assert [g["weight_decay"] for g in ckpt.param_groups] == ([0.1] if args.groups == 1 else [0.1, 0.0])
