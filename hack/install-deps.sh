#!/usr/bin/env bash
# Installs the Debian packages twill's demo and tests use, when missing.
# Idempotent and quiet when everything is there already.
set -euo pipefail

declare -A pkg_of=(
	[ip]=iproute2 [bridge]=iproute2
	[iptables]=iptables
	[nft]=nftables
	[tcpdump]=tcpdump
	[wireguard-go]=wireguard-go [wg]=wireguard-tools
	[ping]=iputils-ping
	[iperf3]=iperf3
	[ps]=procps
	[containerd]=containerd [ctr]=containerd [containerd-shim-runc-v2]=containerd
	[runc]=runc
	[nsenter]=util-linux
)
missing=()
for cmd in "${!pkg_of[@]}"; do
	command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkg_of[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
	echo "missing packages: ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
	exit 1
fi
mapfile -t unique < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "installing ${unique[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${unique[@]}" >/dev/null
