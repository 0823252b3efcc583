#!/usr/bin/env bash
# End-to-end benchmark of connection_limit against HAProxy and caddy-l4.
#
#   bash bench/run.sh            # full run (< 15 min)
#   bash bench/run.sh -quick     # short run (< 2 min)
#
# Any other arguments go to the Go program (bash bench/run.sh -h lists
# them). Everything runs on 127.0.0.1. The report (Markdown) is printed and
# saved to $REPORT (default /tmp/connlimit-e2e-report.md); the results the
# charts are drawn from are saved beside it as JSON ($REPORT with .md
# replaced by .json) and the SVG charts (bench/charts) are drawn into
# $CHARTS (default: $REPORT with .md replaced by -charts/). Progress goes
# to stderr. CADDY_BIN, if set, names the Caddy binary to build and use.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v haproxy >/dev/null 2>&1; then
	echo "installing haproxy" >&2
	SUDO=""
	[ "$(id -u)" = 0 ] || SUDO="sudo"
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq haproxy >/dev/null
fi

# 50 000 waiters need ~110 000 descriptors in this process tree.
ulimit -n 131072 2>/dev/null || ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

BIN_DIR=$(mktemp -d /tmp/e2e-bin.XXXXXX)
trap 'rm -rf "$BIN_DIR"' EXIT
CADDY_BIN=${CADDY_BIN:-$BIN_DIR/caddy}
echo "building $CADDY_BIN from ./cmd/caddy and the benchmark" >&2
go build -o "$CADDY_BIN" ./cmd/caddy
go build -o "$BIN_DIR/e2e" ./bench/e2e
go build -o "$BIN_DIR/draw" ./bench/charts/draw

LIMIT=17m
for a in "$@"; do
	case "$a" in
	-quick | --quick | -quick=true | --quick=true) LIMIT=150s ;;
	-h | -help | --help)
		"$BIN_DIR/e2e" -h
		exit 0
		;;
	esac
done
REPORT=${REPORT:-/tmp/connlimit-e2e-report.md}
RESULTS=${REPORT%.md}.json
CHARTS=${CHARTS:-${REPORT%.md}-charts}
# The program bounds itself (-budget); timeout is the backstop.
timeout --kill-after=20s "$LIMIT" "$BIN_DIR/e2e" -caddy "$CADDY_BIN" -out "$REPORT" -json "$RESULTS" "$@"
echo "report saved to $REPORT, results to $RESULTS" >&2
"$BIN_DIR/draw" -in "$RESULTS" -out "$CHARTS" >/dev/null
echo "charts drawn in $CHARTS" >&2
