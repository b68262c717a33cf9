"""Conversion streams: peak memory does not grow with model size, only with the largest parameter."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ucp
from ucp.testing import scaled_timeout

PARAM_MB = 16


def _save(url: str, n_params: int) -> None:
    numel = PARAM_MB * 2**20 // 4
    g = torch.Generator().manual_seed(n_params)
    model = {f"layers.{i}.weight": torch.randn(numel // 1024, 1024, generator=g) for i in range(n_params)}
    optim = {"state": {k: {"exp_avg": torch.randn(v.shape, generator=g)} for k, v in model.items()},
             "param_groups": [{"params": list(model), "lr": 0.1}]}
    ucp.save({"model": model, "optim": optim}, url, step=1).wait()


def _peak_rss_mb(src: str, dst: str) -> float:
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's size across exec
    code = ("import sys, ucp; ucp.convert(sys.argv[1], sys.argv[2]); "
            "print([int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code, src, dst], capture_output=True, text=True,
                         timeout=scaled_timeout(600), check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_is_bounded_by_the_largest_parameter_not_the_model(tmp_path):
    sizes = {4: None, 24: None}  # 128 MB and 768 MB of state; every parameter has 2 x 16 MB states
    for n in sizes:
        _save(str(tmp_path / f"src{n}"), n)
        sizes[n] = _peak_rss_mb(str(tmp_path / f"src{n}"), str(tmp_path / f"dst{n}"))
    small, large = sizes[4], sizes[24]
    grown = (24 - 4) * 2 * PARAM_MB
    print(f"peak RSS: {small:.0f} MB for 4 params, {large:.0f} MB for 24 params (state grew {grown} MB)")
    # the model grew by 640 MB; memory may grow by a few parameters' worth at most
    assert large - small < 4 * PARAM_MB, (small, large)
    assert torch.equal(ucp.open(str(tmp_path / "dst24")).read("layers.23.weight", "exp_avg").flatten()[:5],
                       ucp.load(str(tmp_path / "src24"))["optim"]["state"]["layers.23.weight"]["exp_avg"].flatten()[:5])
