"""ucp ls: steps under a root with commit status, size and age; local and s3://."""

from __future__ import annotations

import json
import time

from click.testing import CliRunner

import ucp
from ucp.cli import main

from ._sample import gpt2_state, training_state

LS_STEP_KEYS = {"step", "path", "committed", "latest", "bytes", "files", "created", "age_s"}


def ls(*args: str, code: int = 0):
    result = CliRunner().invoke(main, ["ls", *args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def test_table(sample):
    lines = ls(str(sample / "ckpt")).stdout.splitlines()
    assert lines[0].split() == ["STEP", "STATUS", "SIZE", "AGE"]
    rows = [line.split() for line in lines[1:]]
    assert [r[:2] for r in rows] == [["100", "committed"], ["200", "committed"],
                                     ["300", "uncommitted"]]
    assert [r[-1] == "latest" for r in rows] == [False, True, False]
    assert all(r[3] == "KiB" and r[5] == "ago" for r in rows)


def test_json(sample):
    doc = json.loads(ls(str(sample / "ckpt"), "--json").stdout)
    assert doc["schema"] == "ucp.ls" and doc["schema_version"] == 1
    steps = doc["steps"]
    assert all(set(s) == LS_STEP_KEYS for s in steps)
    assert [(s["step"], s["path"], s["committed"], s["latest"], s["files"]) for s in steps] == [
        (100, "step-00000100", True, False, 3), (200, "step-00000200", True, True, 3),
        (300, "step-00000300", False, False, 2)]
    on_disk = sum(f.stat().st_size for f in (sample / "ckpt" / "step-00000200").iterdir())
    assert steps[1]["bytes"] == on_disk
    made = (sample / "ckpt" / "step-00000100" / "manifest.json").stat().st_mtime
    assert all(0 <= s["age_s"] <= time.time() - made + 5 for s in steps)
    assert all(s["created"].endswith("+00:00") for s in steps)


def test_empty_missing_and_not_a_root(tmp_path, sample):
    assert ls(str(tmp_path)).stdout == f"{tmp_path}: no step directories\n"
    r = ls(str(tmp_path / "nope"), code=1)
    assert r.stderr == f"Error: {tmp_path / 'nope'}: no such file or directory\n"


def test_s3(s3_url):
    url, opts = s3_url
    for step in (10, 20):
        ucp.save(training_state(gpt2_state()), url, step=step, storage_options=opts).wait()
    # credentials and endpoint as options (never printed), and from the environment alone
    with_options = ["-o", f"key={opts['key']}", "-o", f"secret={opts['secret']}",
                    "-o", f"client_kwargs.endpoint_url={opts['client_kwargs']['endpoint_url']}"]
    for extra in (with_options, []):
        result = ls(url, "--json", *extra)
        doc = json.loads(result.stdout)
        assert [(s["step"], s["committed"], s["latest"]) for s in doc["steps"]] == [
            (10, True, False), (20, True, True)]
        assert all(s["bytes"] > 10_000 and s["files"] == 3 and s["age_s"] < 600 for s in doc["steps"])
        assert opts["secret"] not in result.output
    table = ls(url).stdout.splitlines()
    assert [line.split()[:2] for line in table[1:]] == [["10", "committed"], ["20", "committed"]]


def test_a_folder_that_is_no_root_of_steps_says_what_it_is(sample, tmp_path):
    universal = str(sample / "universal")
    assert ls(universal).stdout == (f"{universal}: no step directories; this is a universal "
                                    f"checkpoint: `ucp inspect {universal}` shows it\n")
    ds = tmp_path / "ds"
    (ds / "global_step3").mkdir(parents=True)
    (ds / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (ds / "latest").write_text("global_step3")
    assert "this is a DeepSpeed checkpoint: `ucp inspect" in ls(str(ds)).stdout
    (tmp_path / "empty").mkdir()
    assert ls(str(tmp_path / "empty")).stdout == f"{tmp_path / 'empty'}: no step directories\n"
    for root, folder, what in (("titan", "step-40", "a torchtitan checkpoint folder"),
                               ("accel", "pytorch_model_fsdp_0", "an accelerate save_state folder")):
        (tmp_path / root / folder).mkdir(parents=True)
        assert f"this is {what}" in ls(str(tmp_path / root)).stdout
