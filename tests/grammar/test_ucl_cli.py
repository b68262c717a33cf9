"""``ucp spec check`` through click's CliRunner."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ucp.cli._spec import parameter_shapes
from ucp.cli import main

SPEC = '''# two layers of a toy model
hidden = 4
index {layer} over pp = 2
param "layers.{layer}.qkv" split tp dim 0 parts [hidden, hidden, hidden]
param "layers.{layer}.norm" replicate tp
param "head" split tp dim 0 stage last
'''
SHAPES = {"layers.0.qkv": [12, 4], "layers.1.qkv": [12, 4], "layers.0.norm": [4],
          "layers.1.norm": [4], "head": [6, 4]}


@pytest.fixture(autouse=True)
def _restore_ucp_logging():
    """`ucp` installs a stderr log handler on first use; under CliRunner that stream is the
    runner's, so leaving the handler would hide later tests' log output."""
    log = logging.getLogger("ucp")
    handlers, level = list(log.handlers), log.level
    yield
    log.handlers[:] = handlers
    log.setLevel(level)


def run(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "toy.ucl"
    path.write_text(SPEC)
    return str(path)


def _shapes_json(tmp_path, shapes):
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps(shapes))
    return str(path)


def test_help_shows_an_example():
    code, out, _ = run("spec", "check", "--help")
    assert code == 0 and "Example:" in out and "ucp spec check llama.ucl --against" in out


def test_check_spec_alone_and_bundled(spec_file):
    assert run("spec", "check", spec_file)[:2] == (0, f"{spec_file}: ok (3 rules, syntax ok)\n")
    code, out, _ = run("spec", "check", "llama_megatron")
    assert code == 0 and out.startswith("llama_megatron: ok")


def test_syntax_error_shows_line_column_and_caret(tmp_path):
    path = tmp_path / "bad.ucl"
    path.write_text('param "x"\n  split tp dim 0 parts [1, 2,, 3]\n')
    code, out, err = run("spec", "check", str(path))
    assert code == 1 and out == ""  # the error is printed once, on stderr
    lines = err.splitlines()
    assert lines[0] == (f"Error: {path}:2:30: unexpected ','; expected '(', '+', '-', ']', a name, "
                        "an integer")
    assert lines[1:] == ["  split tp dim 0 parts [1, 2,, 3]", " " * 29 + "^"]
    assert sum(line.startswith("Error:") for line in lines) == 1


def test_a_misspelled_bundled_name_lists_the_bundled_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run("spec", "check", "gtp2")
    assert (code, out) == (1, "")
    assert err == ("Error: gtp2: no bundled spec or file named 'gtp2'; bundled: gpt2, "
                   "llama_hf, llama_megatron, mixtral_moe\n")
    code, out, _ = run("spec", "check", "gtp2", "--json")
    assert code == 1 and json.loads(out)["error"]["message"].startswith("no bundled spec or file")


def test_against_json_that_fits(spec_file, tmp_path):
    code, out, err = run("spec", "check", spec_file, "--against", _shapes_json(tmp_path, SHAPES),
                         "--topology", "tp=2,pp=2")
    assert (code, err) == (0, "") and out == f"{spec_file}: ok (3 rules, 5 parameters covered)\n"


def test_against_reports_every_kind_of_problem(spec_file, tmp_path):
    shapes = {k: v for k, v in SHAPES.items() if k != "head"}
    shapes["layers.0.qkv"] = [13, 4]
    shapes["extra"] = [1]
    code, out, err = run("spec", "check", spec_file, "--against", _shapes_json(tmp_path, shapes))
    assert code == 1 and err == f"Error: {spec_file}: 3 problem(s) against {tmp_path / 'shapes.json'}\n"
    assert f"{spec_file}:4: shape: dim 0 of 'layers.0.qkv' is 13, but the parts [4, 4, 4] sum to 12" in out
    assert f"{spec_file}: uncovered: parameter 'extra' matches no rule" in out
    assert f'{spec_file}:6: unmatched: param "head" (line 6) matches no parameter' in out


def test_topology_and_constant_overrides(spec_file, tmp_path):
    against = _shapes_json(tmp_path, SHAPES)
    code, out, _ = run("spec", "check", spec_file, "--against", against, "--topology", "tp=3")
    assert code == 1 and "not split evenly over tp (3 shards)" in out
    code, out, _ = run("spec", "check", spec_file, "--against", against, "--set", "hidden=5")
    assert code == 1 and "sum to 15" in out
    assert run("spec", "check", spec_file, "--set", "nope=1")[0] == 1
    assert run("spec", "check", spec_file, "--set", "hidden")[0] == 2
    assert run("spec", "check", spec_file, "--topology", "tp=zero")[0] == 2


def test_json_output(spec_file, tmp_path):
    shapes = dict(SHAPES, extra=[1])
    code, out, _ = run("spec", "check", spec_file, "--against", _shapes_json(tmp_path, shapes),
                       "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert report["problems"] == [{"kind": "uncovered", "param": "extra", "line": None,
                                   "message": report["problems"][0]["message"]}]


def test_against_safetensors_file_and_directory(spec_file, tmp_path):
    tensors = {k: torch.zeros(v, dtype=torch.bfloat16) for k, v in SHAPES.items()}
    one = tmp_path / "model.safetensors"
    save_file(tensors, str(one))
    assert parameter_shapes(one) == {k: tuple(v) for k, v in SHAPES.items()}
    assert run("spec", "check", spec_file, "--against", str(one))[0] == 0
    shards = tmp_path / "sharded"
    shards.mkdir()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:2]}, str(shards / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[2:]}, str(shards / "model-00002-of-00002.safetensors"))
    assert parameter_shapes(shards) == parameter_shapes(one)
    assert run("spec", "check", spec_file, "--against", str(shards))[0] == 0


@pytest.mark.parametrize("name, content, words", [
    ("a.json", "[1, 2]", "JSON object"),
    ("b.json", '{"w": [2, -1]}', "list of sizes"),
    ("c.json", "{not json", "not a readable JSON"),
    ("d.bin", "xx", "cannot list parameters"),
    ("e.safetensors", "garbage", "not a readable safetensors"),
])
def test_against_unreadable_inputs(spec_file, tmp_path, name, content, words):
    path = tmp_path / name
    path.write_text(content)
    code, _, err = run("spec", "check", spec_file, "--against", str(path))
    assert code == 1 and words in err and err.count("\n") == 1


def test_against_empty_directory(spec_file, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run("spec", "check", spec_file, "--against", str(tmp_path / "empty"))
    assert code == 1 and "no *.safetensors file" in err
