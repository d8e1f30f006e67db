# Two commands do all the set-up on a fresh clone:
#   make chat   installs mmchat into .venv and chats with the embedded default model (SmolLM2-135M-Instruct)
#   make test   installs mmchat with its test dependencies and runs the tests
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet --disable-pip-version-check

.PHONY: chat test test-fast install browser speech-tools vision-adapter clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# the CPU build of torch first, pinned, so nothing pulls a multi-GB CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	touch $@

install: $(VENV)/.installed

chat: $(VENV)/.installed
	$(VENV)/bin/mmchat chat

# the web page test drives Debian's chromium through playwright (never `playwright install`); get it if missing
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium is not installed and could not be: the web page test will be skipped"

# the espeak voice (speech out, and the spoken clips of the speech tests) is Debian's espeak-ng; get it if missing
speech-tools:
	@command -v espeak-ng >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; } || \
	  echo "espeak-ng is not installed and could not be: the espeak voice's tests will be skipped"

test: $(VENV)/.installed browser speech-tools
	$(PY) -m pytest -q --durations=15

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

# the shipped vision adapter for the embedded model (src/mmchat/multimodal/weights/smollm2-vision.safetensors),
# trained again from nothing with the commands it was made with (about 2.5 hours on one core; scenes encoded once
# and cached); benchmarks/RESULTS-vision.md has its held-out accuracy and how to measure it
VISION := $(VENV)/bin/mmchat train vision --scenes 1600 --eval-scenes 60 --threads 1 --warmup-steps 10 \
	--eval-every 0 --eval-batches 4
vision-adapter: $(VENV)/.installed
	$(VISION) --stage 1 --out runs/vision1 --max-steps 80 --stop-at 51
	$(VISION) --stage 2 --init runs/vision1 --out runs/vision2 --max-steps 110
	$(VISION) --stage 2 --out runs/vision2 --resume --max-steps 260 --stop-at 233
	$(VISION) --stage 2 --out runs/vision2 --resume --max-steps 420
	$(VISION) --stage 2 --out runs/vision2 --resume --max-steps 560 --ship

clean:
	rm -rf $(VENV)
