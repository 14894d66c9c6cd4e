# twill: an overlay network for multi-host container clusters.
# `make help` lists the targets.

GO        ?= go
BIN       := bin
TOOLS_BIN := $(BIN)/tools
CNI_BIN   := $(BIN)/cni
GOFLAGS_BUILD := -trimpath

# Test knobs: `make test TESTFLAGS='-run Lease -v'`.
TESTFLAGS ?=
FUZZTIME  ?= 5s

export PATH := $(CURDIR)/$(TOOLS_BIN):$(PATH)

.PHONY: help build test lint tools demo fuzz clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

build: ## build bin/twilld, bin/twillctl and bin/twill
	CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD) -o $(BIN)/ ./cmd/...

# The tools are the real programs the tests run: etcd, etcdctl, kube-apiserver and the
# reference CNI plugins. They come from hack/tools/go.mod so the product's go.mod stays
# lean. The stamp makes `make tools` instant while hack/tools/go.sum is unchanged.
TOOLS_STAMP := $(BIN)/.tools-stamp
tools: $(TOOLS_STAMP) ## build etcd, etcdctl, kube-apiserver and the reference CNI plugins
$(TOOLS_STAMP): hack/tools/go.mod hack/tools/go.sum
	mkdir -p $(TOOLS_BIN) $(CNI_BIN)
	cd hack/tools && CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD) -o ../../$(TOOLS_BIN)/etcd go.etcd.io/etcd/server/v3
	cd hack/tools && CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD) -o ../../$(TOOLS_BIN)/etcdctl go.etcd.io/etcd/etcdctl/v3
	cd hack/tools && CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD) -o ../../$(CNI_BIN)/ \
		github.com/containernetworking/plugins/plugins/main/bridge \
		github.com/containernetworking/plugins/plugins/ipam/host-local \
		github.com/containernetworking/plugins/plugins/main/loopback \
		github.com/containernetworking/plugins/plugins/meta/portmap
	cd hack/tools && CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD) -o ../../$(TOOLS_BIN)/kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
	touch $@

test: tools build ## run every test: unit, fuzz seeds, and the root/namespace integration tests
	TWILL_REQUIRE_ALL=1 $(GO) test -count=1 -timeout 30m $(TESTFLAGS) ./...

lint: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

clean: ## remove built programs (keeps bin/tools unless you delete it)
	rm -f $(BIN)/twilld $(BIN)/twillctl $(BIN)/twill
