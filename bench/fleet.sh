#!/usr/bin/env bash
# Benchmark of fleet zones (connection_limit zones shared by several Caddy
# processes through Redis): round trips per connection, hand-offs across
# nodes, the limit-bound workload against a local zone, added latency, and
# what one zone asks of Redis. See bench/fleet/main.go and BENCHMARKS.md.
#
#   bash bench/fleet.sh            # full run (< 10 min, plus waits for a quiet machine)
#   bash bench/fleet.sh -quick     # short run (< 2 min)
#
# Other arguments go to the Go program (bash bench/fleet.sh -h lists them).
# Everything runs on 127.0.0.1; it starts its own redis-server (Debian's
# redis-server package) and Caddy nodes, and stops them. The report
# (Markdown) is printed and saved to $REPORT (default
# /tmp/connlimit-fleet-report.md); progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
	echo "installing redis-server" >&2
	SUDO=""
	[ "$(id -u)" = 0 ] || SUDO="sudo"
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

BIN_DIR=$(mktemp -d /tmp/fleet-bin.XXXXXX)
trap 'rm -rf "$BIN_DIR"' EXIT
echo "building ./cmd/caddy and the benchmark" >&2
go build -o "$BIN_DIR/caddy" ./cmd/caddy
go build -o "$BIN_DIR/fleet" ./bench/fleet

LIMIT=60m # the measurements take < 10 min; the rest is waiting for the load to drop
for a in "$@"; do
	case "$a" in
	-quick | --quick | -quick=true | --quick=true) LIMIT=5m ;;
	-h | -help | --help)
		"$BIN_DIR/fleet" -h
		exit 0
		;;
	esac
done
REPORT=${REPORT:-/tmp/connlimit-fleet-report.md}
timeout --kill-after=20s "$LIMIT" "$BIN_DIR/fleet" -caddy "$BIN_DIR/caddy" -report "$REPORT" "$@"
echo "report saved to $REPORT" >&2
