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

.PHONY: help build image test lint tools cni-plugins deps demo clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

build: ## build bin/twilld, bin/twillctl and bin/twill
	CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD) -o $(BIN)/ ./cmd/...

# The images, built without Docker or a daemon (hack/tools/image): twill's
# (deploy/Dockerfile's contents: the three programs and a static wireguard-go,
# on no base) and the test pods' (test/workload). Each is a `docker save`
# tarball for `ctr -n k8s.io images import`; the same files give the same
# digest. Tag twill's with e.g. `make image IMAGE_TAG=v0.1.0`.
IMAGE_DIR := $(BIN)/image
IMAGE_TAG ?= dev
image: build $(IMAGE_DIR)/wireguard-go ## build the images bin/image/twill.tar (twill:dev, or IMAGE_TAG=...) and bin/image/twill-test-workload.tar, without Docker
	CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD) -o $(IMAGE_DIR)/workload ./test/workload
	$(TOOLS_GO) -o ../../$(TOOLS_BIN)/twill-image ./image
	$(TOOLS_BIN)/twill-image -o $(IMAGE_DIR)/twill.tar -tag twill:$(IMAGE_TAG) -arch $$($(GO) env GOARCH) \
		-entrypoint /twilld -env PATH=/usr/local/bin:/usr/bin:/bin \
		$(BIN)/twilld=/twilld $(BIN)/twillctl=/twillctl $(BIN)/twill=/twill \
		$(IMAGE_DIR)/wireguard-go=/usr/local/bin/wireguard-go
	$(TOOLS_BIN)/twill-image -o $(IMAGE_DIR)/twill-test-workload.tar -tag twill-test/workload:1 -arch $$($(GO) env GOARCH) \
		-entrypoint /workload $(IMAGE_DIR)/workload=/workload

# The tools are the real programs the tests run: etcd, etcdctl, kube-apiserver, crictl
# and the reference CNI plugins. They come from hack/tools/go.mod so the product's go.mod stays
# lean. Each is rebuilt only when hack/tools/go.mod or go.sum changes, so `make tools`
# is instant when they are current.
TOOLS_MOD := hack/tools/go.mod hack/tools/go.sum
TOOLS_GO  := cd hack/tools && CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD)
CNI_PLUGINS := bridge host-local loopback portmap

KUBE_CMDS := kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet

tools: $(TOOLS_BIN)/etcd $(TOOLS_BIN)/etcdctl $(addprefix $(TOOLS_BIN)/,$(KUBE_CMDS)) $(TOOLS_BIN)/crictl $(TOOLS_BIN)/pause containerd2 cni-plugins ## build etcd, etcdctl, Kubernetes (kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, kubelet), crictl, containerd 2, the test pods' pause program and the reference CNI plugins

cni-plugins: $(addprefix $(CNI_BIN)/,$(CNI_PLUGINS)) ## build only the reference CNI plugins (what the lab needs)

$(TOOLS_BIN)/etcd: $(TOOLS_MOD)
	$(TOOLS_GO) -o ../../$@ go.etcd.io/etcd/server/v3
$(TOOLS_BIN)/etcdctl: $(TOOLS_MOD)
	$(TOOLS_GO) -o ../../$@ go.etcd.io/etcd/etcdctl/v3
# The version the Kubernetes programs report (the kubelet's is checked
# against the API server's): the pinned k8s.io/kubernetes, e.g. v1.37.2.
$(addprefix $(TOOLS_BIN)/,$(KUBE_CMDS)): $(TOOLS_BIN)/%: $(TOOLS_MOD)
	v=$$(cd hack/tools && $(GO) list -m -f '{{.Version}}' k8s.io/kubernetes) && \
	$(TOOLS_GO) -ldflags "-X k8s.io/component-base/version.gitVersion=$$v \
		-X k8s.io/component-base/version.gitMajor=$$(echo $$v | cut -d. -f1 | tr -d v) \
		-X k8s.io/component-base/version.gitMinor=$$(echo $$v | cut -d. -f2)" \
		-o ../../$@ k8s.io/kubernetes/cmd/$*
# wireguard-go, static, for twill's image (not on the tests' PATH: the lab
# and the tests use the machine's, Debian's).
$(BIN)/image/wireguard-go: $(TOOLS_MOD)
	$(TOOLS_GO) -o ../../$@ golang.zx2c4.com/wireguard
$(TOOLS_BIN)/crictl: $(TOOLS_MOD)
	$(TOOLS_GO) -o ../../$@ sigs.k8s.io/cri-tools/cmd/crictl
# The sandbox program of the containerd test's pods (nothing can be pulled here).
$(TOOLS_BIN)/pause: test/pause/main.go
	CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD) -o $@ ./test/pause

# containerd 2.x, for the CRI test beside Debian's containerd 1.6. Its own module
# (hack/containerd), as its dependencies pin other versions than hack/tools'.
CTRD_MOD := hack/containerd/go.mod hack/containerd/go.sum
CTRD_BIN := $(TOOLS_BIN)/containerd2
CTRD_CMDS := containerd containerd-shim-runc-v2 ctr
.PHONY: containerd2
containerd2: $(addprefix $(CTRD_BIN)/,$(CTRD_CMDS))
$(addprefix $(CTRD_BIN)/,$(CTRD_CMDS)): $(CTRD_BIN)/%: $(CTRD_MOD)
	cd hack/containerd && CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD) -tags no_btrfs,no_devmapper,no_zfs \
		-ldflags "-X github.com/containerd/containerd/v2/version.Version=$$($(GO) list -m -f '{{.Version}}' github.com/containerd/containerd/v2)" \
		-o ../../$@ github.com/containerd/containerd/v2/cmd/$*

$(CNI_BIN)/bridge $(CNI_BIN)/loopback: $(CNI_BIN)/%: $(TOOLS_MOD)
	$(TOOLS_GO) -o ../../$@ github.com/containernetworking/plugins/plugins/main/$*
$(CNI_BIN)/host-local: $(TOOLS_MOD)
	$(TOOLS_GO) -o ../../$@ github.com/containernetworking/plugins/plugins/ipam/host-local
$(CNI_BIN)/portmap: $(TOOLS_MOD)
	$(TOOLS_GO) -o ../../$@ github.com/containernetworking/plugins/plugins/meta/portmap

deps: ## install the Debian packages the demo and tests use (iproute2, iptables, nftables, tcpdump, wireguard-go, ping, iperf3, containerd, runc), when missing
	@hack/install-deps.sh

demo: deps build cni-plugins ## run the lab: 3 hosts, 2 pods each, every pod pings every other (needs root)
	$(BIN)/twillctl lab run --hosts 3 --pods-per-host 2

demo-kubelet: deps tools build image ## the same on real kubelets: 2 nodes (containerd, kubelet), deploy/kube-twill.yaml as shipped, pods that reach each other (needs root)
	$(BIN)/twillctl lab run --kubelet

test: deps tools build image ## run every test: unit, fuzz seeds, and the root/namespace integration tests
	cd bench && $(GO) vet ./...  # the bench module is its own; it must keep building
	cd deploy/helm && TWILL_REQUIRE_ALL=1 $(GO) test -count=1 ./...
	TWILL_REQUIRE_ALL=1 $(GO) test -count=1 -timeout 30m $(TESTFLAGS) ./...

lint: ## gofmt and go vet (twill's module and the bench module)
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	cd bench && $(GO) vet ./...
	cd deploy/helm && $(GO) vet ./...

clean: ## remove built programs (keeps bin/tools unless you delete it)
	rm -f $(BIN)/twilld $(BIN)/twillctl $(BIN)/twill
	rm -rf $(IMAGE_DIR)

# Benchmarks (issue 6). Runs as root in namespaces named twbench-*, about 10
# minutes on 2 cores; `make bench BENCHFLAGS=--quick` for a short try, or
# e.g. BENCHFLAGS='--sections 1,2' for some figures only.
BENCHFLAGS ?=
.PHONY: bench
bench: deps build cni-plugins $(TOOLS_BIN)/etcd $(TOOLS_BIN)/kube-apiserver ## measure twill against its targets and the kernel's limits (root, ~8 min): bench/out/report.json
	cd bench && CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD) -o ../$(BIN)/twillbench ./cmd/twillbench
	$(BIN)/twillbench --repo $(CURDIR) --go $(GO) $(BENCHFLAGS)
