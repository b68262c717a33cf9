"""The README's "Save and load" snippet, run as written (on a local path instead of S3): the
checkpoint it writes loads back, and `ucp inspect` and `ucp convert` accept it."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from click.testing import CliRunner

import ucp
from ucp.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_snippet(heading: str) -> str:
    """The first ```python block under ``## heading`` of the README."""
    section = README.read_text().split(f"\n## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_save_and_load_snippet_converts_end_to_end(tmp_path):
    snippet = readme_snippet("Save and load")
    assert '"s3://bucket/run-7"' in snippet
    url = tmp_path / "run-7"
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. ucp.save's warning about unnamed optimizer state
        exec(snippet.replace('"s3://bucket/run-7"', repr(str(url))),  # noqa: S102 - the README's own code
             {"model": model, "opt": opt, "step": 7})
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())  # loaded back

    runner = CliRunner()
    r = runner.invoke(main, ["inspect", str(url)])
    assert r.exit_code == 0 and "0.weight" in r.stdout, r.output
    r = runner.invoke(main, ["convert", str(url), str(tmp_path / "universal")])
    assert r.exit_code == 0, r.output
    universal = ucp.open(str(tmp_path / "universal"))
    assert universal.step == 7
    for name in params:
        assert torch.equal(universal.read(name, state="fp32"), params[name]), name
        assert torch.equal(universal.read(name, state="exp_avg"), moments[name]), name
