"""docs/ucl.md stays true: its UCL blocks load, its Python blocks run, its error output is real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ucp.grammar import UclError, load_spec

DOC = Path(__file__).resolve().parents[2] / "docs" / "ucl.md"
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def _blocks(language):
    return [text for lang, text in BLOCKS if lang == language]


@pytest.mark.parametrize("text", _blocks("ucl"))
def test_ucl_blocks_load(text):
    load_spec(text)


@pytest.mark.parametrize("text", _blocks("python"))
def test_python_blocks_run(text):
    exec(compile(text, str(DOC), "exec"), {})  # noqa: S102 - our own documentation


def test_error_example_is_what_ucp_prints(tmp_path):
    shown = next(t for t in _blocks("") if t.startswith("llama.ucl:"))
    path = tmp_path / "llama.ucl"
    path.write_text('ffn = 4\nparam "w" split tp dim 0 parts [ffn, ffn,, ffn]\n')
    with pytest.raises(UclError) as info:
        load_spec(path)
    assert str(info.value).replace(str(path), "llama.ucl") == shown.rstrip("\n")


@pytest.mark.parametrize("key", [
    "tp_replicated_parameter_patterns", "parameter_to_average_patterns",
    "parameter_with_row_parallelism_patterns", "vocabulary_parameter_patterns",
    "original_vocab_size", "pipeline_replicated_parameter_patterns",
    "parameter_with_2_sub_params_cat_dim_0", "parameter_with_sub_params",
    "sub_param_shard_widths", "expert_parameter_patterns"])
def test_every_deepspeed_key_is_mapped(key):
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ") and key in line]
    assert rows, key
    ucl = rows[0].split("|")[2]
    snippet = re.search(r"`([^`]*)`", ucl).group(1)
    snippet = snippet.replace("ORIGINAL", "10").replace("PADDED", "12").replace("UNIT", "1")
    snippet = snippet.replace("D ", "0 ").replace("[a, b, c]", "[2, 4, 4]").replace("N", "2")
    load_spec(f'param "w" {snippet}')
