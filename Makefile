# Two commands do all the set-up on a fresh clone:
#   make chat   installs mmchat into .venv and chats with the embedded default model (SmolLM2-135M-Instruct)
#   make test   installs mmchat with its test dependencies and runs the tests
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet --disable-pip-version-check

.PHONY: chat test test-fast install clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# the CPU build of torch first, pinned, so nothing pulls a multi-GB CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	touch $@

install: $(VENV)/.installed

chat: $(VENV)/.installed
	$(VENV)/bin/mmchat chat

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV)
