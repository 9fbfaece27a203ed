# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -m pip install -q -e '.[serve,eval,notebooks,test,ray,remote,onnx,heif,milvus]' 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c "import fsclip, open_clip, faiss, peft"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fsclip demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check fsclip tests eval

bench: $(STAMP)
	$(BIN)/python -m eval.bench all

clean:
	rm -rf $(VENV) fsclip-demo .pytest_cache
