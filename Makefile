# The two set-up commands: `make run` and `make test`. Each creates .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run bookstore test lint typecheck unit system-tools kube-peers istio-client bench soak kube clean protos

# A venv whose creation failed halfway (no ensurepip) has a python but no pip: made again.
$(STAMP): pyproject.toml
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/python examples/serve_defaults.py

# The bookstore mesh with real Envoys configured over ADS (docs/mesh.md, walkthrough).
bookstore: $(STAMP)
	$(BIN)/python examples/bookstore/run.py

lint: $(STAMP)
	$(BIN)/ruff check meshca tests bench examples
	$(BIN)/ruff format --check meshca tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy --strict meshca

# System tools some tests use: iptables and ip (iproute2) for the intercept-mode tests
# (run as root in network namespaces the tests create), tcpdump for the ambient test's
# capture between nodes. Installed when this is a Debian machine and we are root;
# otherwise those tests say they are skipped and why. Never fails.
system-tools:
	@PATH="$$PATH:/usr/sbin:/sbin"; missing=""; \
	command -v iptables >/dev/null 2>&1 || missing="$$missing iptables"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v tcpdump >/dev/null 2>&1 || missing="$$missing tcpdump"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing$$missing (for the intercept-mode tests)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) \
			>/dev/null 2>&1 || echo "could not install$$missing: the tests needing them will be skipped"; \
	fi

# The Kubernetes test peers the `kube` tests start (etcd and kube-apiserver; the tests make
# EndpointSlices themselves, so kube-controller-manager is only in `make kube`): built once
# from the Go module proxy into ~/.cache/meshca/k8s-<version>/bin by tests/kube/build.sh,
# which says what it builds; later runs reuse them. A cold build on a fresh machine (empty
# HOME: no Go build or module cache) took 10 min for kube-apiserver and 1 min more for
# etcd on 2 cores (load about 5), so that `make test` as a whole took 20 min there;
# kube-controller-manager would add several more, so it is not built here. Without Go the kube tests are skipped, saying so.
KUBE_TEST_PEERS := etcd kube-apiserver
kube-peers:
	@if command -v go >/dev/null 2>&1; then bash tests/kube/build.sh $(KUBE_TEST_PEERS); \
	else echo "no Go on PATH: the Kubernetes test peers are not built, the kube tests will be skipped"; fi

unit: $(STAMP) system-tools kube-peers istio-client
	$(BIN)/pytest -q

test: lint typecheck unit

# Benchmarks (not tests): each prints ratios against a baseline measured in the same run.
bench: $(STAMP)
	$(BIN)/python bench/issue_throughput.py
	$(BIN)/python bench/sds_fanout.py
	$(BIN)/python bench/xds_scale.py
	$(BIN)/python bench/vault_issue.py
	$(BIN)/python bench/agent.py

soak: $(STAMP)
	$(BIN)/python bench/soak_rotation.py

# Every Kubernetes peer (kube-apiserver, kube-controller-manager, etcd), built from the Go
# module proxy into ~/.cache/meshca once. Needs Go; `make test` builds only what its tests use.
kube:
	bash tests/kube/build.sh

# Istio's own Go client of its CA API (istio.io/api), built once from the Go module proxy
# into ~/.cache/meshca/istio-ca-client-<version>; tests/test_kube_istio.py checks meshca's
# wire compatibility with it when it is there (about a minute with Go's caches warm).
istio-client:
	@if command -v go >/dev/null 2>&1; then bash tests/istio_client/go/build.sh; \
	else echo "no Go on PATH: Istio's Go client is not built, its tests will be skipped"; fi

# Regenerate meshca/ca_api/ca_pb2.py{,i} and istio_ca_pb2.py{,i} (Istio's CA API) from their
# .proto files (grpcio-tools only in this venv;
# the service bindings are built from its descriptor in meshca/ca_api/rpc.py).
protos: $(STAMP)
	$(BIN)/python -m pip install --quiet 'grpcio-tools==1.85.1'
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
		meshca/ca_api/ca.proto meshca/ca_api/istio_ca.proto

clean:
	rm -rf $(VENV) .meshca .pytest_cache .mypy_cache .ruff_cache
