"""Behaviour shared by every command: help with an example, exit codes, one-line errors,
--verbose tracebacks, progress bars on a terminal only, secrets never printed; and the real
``ucp`` entry point in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import ucp.cli._base
import ucp.cli
from ucp import UcpError
from ucp.cli import add_secrets, main, ucp_command


def leaf_commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from leaf_commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,)


def test_every_command_has_help_with_an_example():
    names = list(leaf_commands(main))
    assert {("inspect",), ("verify",), ("export",), ("ls",), ("convert",)} <= set(names)
    for name in names:
        r = CliRunner().invoke(main, [*name, "--help"])
        assert r.exit_code == 0, name
        example = r.stdout.split("Example:", 1)
        assert len(example) == 2 and " ucp " in example[1].split("Options:")[0], name


@pytest.mark.parametrize("args", [["inspect"], ["verify", "--bogus", "x"], ["nope"],
                                  ["export", "a"], ["ls", "x", "-o", "novalue"],
                                  ["export", "a", "b", "--max-shard-size", "-5"]])
def test_usage_errors_exit_2(args):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "Usage:" in r.stderr and "Error:" in r.stderr, r.output


def test_errors_are_one_line_and_verbose_adds_the_traceback(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zarr.json").write_text("{not json")
    r = CliRunner().invoke(main, ["inspect", str(bad)])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith(f"Error: {bad}/zarr.json: not the group metadata")
    assert r.stderr.count("\n") == 1
    r = CliRunner().invoke(main, ["--verbose", "inspect", str(bad)])
    assert r.exit_code == 1 and "Traceback (most recent call last)" in r.stderr
    assert "JSONDecodeError" in r.stderr and r.stderr.splitlines()[-1].startswith("Error: ")


def _demo_group() -> click.Group:
    @click.group()
    @click.option("--verbose", is_flag=True)
    def demo(verbose):
        pass

    @demo.command()
    @click.option("-o", "secret")
    @click.option("--kind", default="ucp")
    @ucp_command
    def boom(secret, kind):
        add_secrets(click.get_current_context(), {"client_kwargs": {"aws_secret_access_key": secret}})
        if kind == "ucp":
            raise UcpError(f"cannot list s3://admin:hunter22@bucket/x with {secret}\nmore detail")
        raise KeyError(f"unexpected {secret}")

    return demo


@pytest.mark.parametrize("verbose", [False, True])
@pytest.mark.parametrize("kind", ["ucp", "bug"])
def test_secrets_are_never_printed(verbose, kind, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ENV-SECRET-42")
    args = (["--verbose"] if verbose else []) + ["boom", "-o", "TOPSECRET-1234", "--kind", kind]
    r = CliRunner().invoke(_demo_group(), args)
    assert r.exit_code == 1
    assert "TOPSECRET-1234" not in r.output and "hunter22" not in r.output
    last = r.stderr.splitlines()[-1]
    if kind == "ucp":
        assert last.startswith("Error: cannot list s3://***@bucket/x with ***")
    else:
        assert last.startswith("Error: KeyError: 'unexpected ***'")
    assert ("Traceback" in r.stderr) == verbose
    assert ucp.cli.redact("key ENV-SECRET-42 here") == "key *** here"


def test_progress_bar_only_on_a_terminal_and_not_quiet(sample, monkeypatch):
    tty = types.SimpleNamespace(stderr=types.SimpleNamespace(isatty=lambda: True))
    monkeypatch.setattr(ucp.cli._base, "sys", tty)
    path = str(sample / "ckpt")
    assert "verify" in CliRunner().invoke(main, ["verify", path]).stderr
    assert CliRunner().invoke(main, ["verify", path, "--quiet"]).stderr == ""
    assert CliRunner().invoke(main, ["--quiet", "verify", path]).stderr == ""
    monkeypatch.undo()
    assert CliRunner().invoke(main, ["verify", path]).stderr == ""  # CliRunner: not a terminal


UCP = Path(sys.executable).with_name("ucp")


@pytest.mark.skipif(not UCP.exists(), reason="the ucp entry point is not installed")
def test_the_real_entry_point(sample, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # stderr is a pipe here: no progress bar, so stderr stays empty
    p = subprocess.run([str(UCP), "verify", str(sample / "universal"), "--json"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    doc = json.loads(p.stdout)
    assert doc["ok"] and doc["checked"]["params"] == 29
    p = subprocess.run([str(UCP), "inspect", str(tmp_path / "nowhere")], capture_output=True,
                       text=True, timeout=120, env=env)
    assert (p.returncode, p.stdout, p.stderr) == (
        1, "", f"Error: {tmp_path / 'nowhere'}: no such file or directory\n")


@pytest.mark.parametrize("command", [["inspect", "{ckpt}"], ["verify", "{ckpt}"],
                                     ["convert", "{ckpt}", "{out}"],
                                     ["export", "{ckpt}", "{out}"],
                                     ["reshard", "{ckpt}", "{out}", "--to", "dp=1"]])
def test_every_spec_option_names_a_misspelled_bundled_spec(command, sample, tmp_path,
                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a.format(ckpt=sample / "ckpt", out=tmp_path / "out") for a in command]
    r = CliRunner().invoke(main, [*args, "--spec", "gtp2"])
    assert (r.exit_code, r.stdout) == (1, "")
    assert r.stderr == ("Error: gtp2: no bundled spec or file named 'gtp2'; bundled: gpt2, "
                        "llama_hf, llama_megatron, mixtral_moe\n")


_PROBE = """
import json, sys
from ucp.cli import main
try:
    main(sys.argv[1:], prog_name="ucp")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "zarr", "numpy", "safetensors", "lark") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize("args, code", [
    (["--help"], 0), (["--version"], 0), (["ls", "{ckpt}"], 0), (["ls", "{ckpt}", "--json"], 0),
    (["spec", "check", "--help"], 0), (["inspect"], 2), (["nope"], 2),
    (["reshard", "a", "b", "--to", "tp=zero"], 2), (["export", "a", "b", "--max-shard-size", "-5"], 2),
    (["ls", "x", "-o", "novalue"], 2)])
def test_help_version_ls_and_usage_errors_import_no_torch(args, code, sample):
    argv = [a.format(ckpt=sample / "ckpt") for a in args]
    p = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True,
                       timeout=120)
    found = json.loads(p.stderr.strip().splitlines()[-1])
    assert found == {"code": code, "heavy": []}, p.stderr


def test_the_grammar_imports_no_torch():
    probe = "import sys, ucp.grammar; print(sorted(m for m in sys.modules if m.startswith('torch')))"
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout) == (0, "[]\n"), p.stderr


def test_the_command_modules_never_import_the_group():
    """ucp.cli imports the command modules; none of them imports ucp.cli back (no cycle)."""
    import ast

    folder = Path(ucp.cli.__file__).parent
    modules = sorted(p for p in folder.glob("_*.py"))
    assert {m.stem for m in modules} >= {"_base", "_commands", "_inspect", "_spec", "_reshard", "_diff"}
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                assert target not in (".", "ucp.cli"), f"{path.name} imports {target}"
                if target == "ucp":
                    assert not any(a.name == "cli" for a in node.names), path.name


def test_ctrl_c_exits_130_with_one_line(sample, monkeypatch):
    import ucp.ops._inspect

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ucp.ops._inspect, "inspect_checkpoint", interrupted)
    r = CliRunner().invoke(main, ["inspect", str(sample / "ckpt")])
    assert (r.exit_code, r.stdout, r.stderr) == (130, "", "Error: interrupted (Ctrl-C)\n")


def test_an_interrupted_export_leaves_no_empty_directory(sample, tmp_path, monkeypatch):
    import ucp.ops._export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ucp.ops._export, "_read", interrupted)  # the first shard is open
    dst = tmp_path / "hf"
    r = CliRunner().invoke(main, ["export", str(sample / "universal"), str(dst)])
    assert r.exit_code == 130 and not dst.exists(), r.output
    dst.mkdir()  # a directory the user made stays
    r = CliRunner().invoke(main, ["export", str(sample / "universal"), str(dst)])
    assert r.exit_code == 130 and dst.is_dir()


def test_sigint_while_a_command_imports_torch_is_one_line_and_130(tmp_path):
    import signal
    import time

    code = ("import sys; from ucp.cli import main; print('ready', flush=True); "
            "main(sys.argv[1:], prog_name='ucp')")
    # as from a terminal: SIGINT at its default (a disposition an earlier test left ignored in
    # this process would be inherited, and the child would never see the Ctrl-C)
    p = subprocess.Popen([sys.executable, "-c", code, "inspect", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.readline() == "ready\n"
    time.sleep(0.2)  # inside the command: importing torch and the readers takes seconds
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert (p.returncode, out, err) == (130, "", "Error: interrupted (Ctrl-C)\n")


# -- one set of conventions across commands -------------------------------------------------------

def _command(name: tuple[str, ...]) -> click.Command:
    cmd: click.Command = main
    for part in name:
        cmd = cmd.commands[part]
    return cmd


def test_every_command_taking_a_url_takes_storage_options_and_workers_means_one_thing():
    url_args = {"src", "dst", "path", "url"}
    helps = set()
    for name in leaf_commands(main):
        params = {p.name: p for p in _command(name).params}
        if url_args & {n for n, p in params.items() if isinstance(p, click.Argument)}:
            assert "-o" in params["options"].opts, name
        if "workers" in params and "--workers" in params["workers"].opts:
            helps.add(params["workers"].help)
    assert helps == {"Worker processes converting in parallel."}
    assert "--io-threads" in {o for p in _command(("reshard",)).params for o in p.opts}


def _option_args(options: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in options.items():
        if isinstance(value, dict):
            out += _option_args(value, f"{prefix}{key}.")
        else:
            out += ["-o", f"{prefix}{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return out


def test_convert_and_reshard_read_s3_with_storage_options(sample, tmp_path, s3_url):
    url, opts = s3_url
    ucp.save(ucp.load(str(sample / "ckpt")), url, step=200, storage_options=opts).wait()
    o = _option_args(opts)
    r = CliRunner().invoke(main, ["convert", url, str(tmp_path / "u"), *o])
    assert r.exit_code == 0 and "wrote" in r.stdout, r.output
    r = CliRunner().invoke(main, ["reshard", url, str(tmp_path / "r"), "--to", "dp=1", *o])
    assert r.exit_code == 0 and "wrote" in r.stdout, r.output
    assert "testing-secret" not in r.output


def test_errors_speak_in_options_not_keyword_arguments(sample, tmp_path):
    dst = str(tmp_path / "u")
    assert CliRunner().invoke(main, ["convert", str(sample / "ckpt"), dst]).exit_code == 0
    r = CliRunner().invoke(main, ["convert", str(sample / "ckpt"), dst])
    assert r.exit_code == 1 and "pass --overwrite to replace it" in r.stderr, r.stderr
    assert "overwrite=True" not in r.stderr
    assert ucp.cli.cli_terms("pass overwrite=True (--overwrite) or overwrite=True") == \
        "pass --overwrite or --overwrite"


def test_convert_says_a_missing_source_does_not_exist(tmp_path):
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "nowhere"), str(tmp_path / "u")])
    assert (r.exit_code, r.stderr) == (
        1, f"Error: {tmp_path / 'nowhere'}: no such file or directory; check the path\n")
    assert not (tmp_path / "u").exists()


@pytest.mark.parametrize("command, dst, where", [
    (["convert", "{ckpt}"], "{ckpt}", "is the source itself"),
    (["convert", "{ckpt}"], "{ckpt}/universal", "lies inside the source"),
    (["reshard", "{ckpt}"], "{ckpt}/", "is the source itself"),
    (["export", "{universal}"], "{root}", "contains the source")])
def test_a_destination_overlapping_the_source_is_refused(command, dst, where, sample, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(sample, work)
    paths = {"ckpt": work / "ckpt", "universal": work / "universal", "root": work}
    args = [a.format(**paths) for a in command] + [dst.format(**paths)]
    if command[0] == "reshard":
        args += ["--to", "dp=1"]
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    r = CliRunner().invoke(main, args)
    assert (r.exit_code, r.stdout) == (1, ""), r.output
    assert r.stderr == (f"Error: {dst.format(**paths)}: the destination {where} ({args[1]}); "
                        "writing there would mix the output with the source's files: choose a "
                        "destination outside it\n")
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("command", ["convert", "reshard", "export"])
def test_a_destination_holding_other_files_is_refused(command, sample, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    src = sample / ("universal" if command == "export" else "ckpt")
    args = [command, str(src), str(dst)] + (["--to", "dp=1"] if command == "reshard" else [])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    assert "notes.txt" in r.stderr and "new or empty directory" in r.stderr, r.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt"]  # nothing written

