# One virtualenv, made and filled by the targets that need it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto' | sort)

.PHONY: run test test-services test-shared lint typecheck fmt proto proto-check lint-proto client-sync client-check bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## run: start the service on embedded defaults (gRPC :50051, data under ./data)
run: $(STAMP)
	@echo 'aiserver, grpcurl and buf are in $(BIN): export PATH="$(CURDIR)/$(BIN):$$PATH"'
	$(BIN)/aiserver serve

## test: the whole suite, plus generated-code drift, proto lint, ruff and mypy
test: $(STAMP) test-services proto-check client-check lint-proto lint typecheck
	$(BIN)/pytest -q

## test-services: start PostgreSQL and install the test browsers when missing (idempotent)
test-services:
	bash tools/test_services.sh

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

# Imported protos come from installed wheels (googleapis-common-protos, protovalidate), not git.
build/proto-deps: $(STAMP) tools/proto_deps.py
	$(BIN)/python tools/proto_deps.py build/proto-deps

## proto: regenerate generated/ from protos/
proto: build/proto-deps
	$(BIN)/python tools/gen_protos.py --out generated

## proto-check: fail when generated/ differs from what the protos produce
proto-check: build/proto-deps
	$(BIN)/python tools/gen_protos.py --check generated

## client-sync: regenerate the blocking client (client/_sync.py) from the asyncio one
client-sync: $(STAMP)
	$(BIN)/python tools/gen_sync_client.py

## client-check: fail when client/_sync.py differs from what client/_async.py produces
client-check: $(STAMP)
	$(BIN)/python tools/gen_sync_client.py --check

# buf lints the image protoc builds: validate.proto comes as a descriptor set, not a source.
lint-proto: build/proto-deps
	$(BIN)/python tools/gen_protos.py --image build/imagetasks.binpb
	$(BIN)/buf lint build/imagetasks.binpb --path imagetasks --config buf.yaml

## bench: measurements against baselines, written to bench/results/
bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
