# One virtualenv, made and filled by the targets that need it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto' | sort)

.PHONY: run test test-shared lint typecheck fmt proto proto-check lint-proto bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## run: start the service on embedded defaults (gRPC :50051, data under ./data)
run: $(STAMP)
	$(BIN)/aiserver serve

## test: the whole suite, plus generated-code drift, proto lint, ruff and mypy
test: $(STAMP) proto-check lint-proto lint typecheck
	$(BIN)/pytest -q

## test-shared: service tests with every service on PostgreSQL + S3 (moto) instead of the
## embedded SQLite + folder (docs/scale-out.md)
test-shared: $(STAMP)
	AISERVER_TEST_BACKENDS=postgres+s3 $(BIN)/pytest -q tests/api tests/jobs tests/test_server.py \
	  tests/test_retention.py tests/gateway/test_artifacts_http.py tests/security/test_artifact_access.py

lint: $(STAMP)
	$(BIN)/ruff check src tests tools $(wildcard bench)
	$(BIN)/ruff format --check src tests tools $(wildcard bench)

typecheck: $(STAMP)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format src tests tools $(wildcard bench)
	$(BIN)/ruff check --fix src tests tools $(wildcard bench)

# googleapis' protos come from the installed googleapis-common-protos wheel, not from git.
build/proto-deps: $(STAMP)
	rm -rf build/proto-deps && mkdir -p build/proto-deps/google/api build/proto-deps/google/rpc
	$(BIN)/python -c "import google.api, google.rpc, shutil, pathlib; \
	api = pathlib.Path(google.api.__path__[0]); rpc = pathlib.Path(google.rpc.__path__[0]); \
	[shutil.copy(api / f, 'build/proto-deps/google/api/') for f in ('annotations.proto', 'http.proto')]; \
	shutil.copy(rpc / 'status.proto', 'build/proto-deps/google/rpc/')"

## proto: regenerate generated/ from protos/
proto: build/proto-deps
	$(BIN)/python tools/gen_protos.py --out generated

## proto-check: fail when generated/ differs from what the protos produce
proto-check: build/proto-deps
	$(BIN)/python tools/gen_protos.py --check generated

lint-proto: build/proto-deps
	$(BIN)/buf lint --path protos/imagetasks

## bench: measurements against baselines, written to bench/results/
bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
