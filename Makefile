# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch is pinned and installed first so that nothing resolves a newer (CUDA) build; DeepSpeed
# (for the real-checkpoint tests) installs without prebuilt ops (DS_BUILD_OPS=0); torchtitan
# without its own dependencies (its datasets pin downgrades fsspec; the torchtitan extra has what
# its imported parts need).
TORCH_PIN := torch==2.13.0
# DeepSpeed JIT-builds its CPU op under a lock: the project's runs keep theirs in .venv, so a run
# killed mid-build never blocks DeepSpeed processes elsewhere (nor theirs this project's).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
# megatron-core 0.19 (real Megatron checkpoints in the tests) declares Python >= 3.12 but runs on
# 3.11 on CPU: installed with --ignore-requires-python, torch pinned in the same command, and after
# the project (whose numpy then satisfies it: otherwise pip would pick a numpy that has no wheel
# for 3.11 and try to build it).

.PHONY: venv demo test test-fast clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e '.[s3,test,deepspeed,demo,torchtitan]' $(TORCH_PIN)
	$(BIN)/python -m pip install -q --ignore-requires-python megatron-core==0.19.2 triton==3.9.0 einops $(TORCH_PIN)
	$(BIN)/python -m pip install -q --no-deps torchtitan==0.3.0 $(TORCH_PIN)
	touch $(STAMP)

demo: venv
	$(BIN)/python examples/demo.py

test: venv
	$(BIN)/python -m pytest -q --durations=15

test-fast: venv
	$(BIN)/python -m pytest -q --durations=15 -m 'not slow'

clean:
	rm -rf $(VENV) build *.egg-info
