#!/usr/bin/env bash
# Benchmark of fair_share (issue 18): one zone of max_connections 20, a
# backend holding each connection 20 ms, a heavy tenant H (200 clients)
# and four light tenants (4 clients each), each from its own 127.0.0.x
# address; connection_limit FIFO, fair_share, fair_share with H of
# weight 3, and HAProxy (maxconn + queue). See bench/fair/main.go and
# docs/bench/fair.md.
#
#   bash bench/fair.sh           # 4 rounds (about 4 minutes)
#   bash bench/fair.sh -quick    # 1 round of short runs (< 1 minute)
#
# Other arguments go to the Go program (bash bench/fair.sh -h lists them).
# Everything runs on 127.0.0.1. The report (Markdown) is printed and saved
# to $REPORT (default /tmp/connlimit-fair-report.md), the chart of the
# light tenants' waits to $SVG (default: $REPORT with .md replaced by
# .svg); progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v haproxy >/dev/null 2>&1; then
	echo "installing haproxy" >&2
	SUDO=""
	[ "$(id -u)" = 0 ] || SUDO="sudo"
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq haproxy >/dev/null
fi

BIN_DIR=$(mktemp -d /tmp/fair-bin.XXXXXX)
trap 'rm -rf "$BIN_DIR"' EXIT
echo "building ./cmd/caddy and the benchmark" >&2
go build -o "$BIN_DIR/caddy" ./cmd/caddy
go build -o "$BIN_DIR/fair" ./bench/fair

for a in "$@"; do
	case "$a" in
	-h | -help | --help)
		"$BIN_DIR/fair" -h
		exit 0
		;;
	esac
done
REPORT=${REPORT:-/tmp/connlimit-fair-report.md}
SVG=${SVG:-${REPORT%.md}.svg}
# The program bounds itself (-budget); timeout is the backstop.
timeout --kill-after=20s 10m "$BIN_DIR/fair" -caddy "$BIN_DIR/caddy" -out "$REPORT" -svg "$SVG" -json "${REPORT%.md}.json" "$@"
echo "report saved to $REPORT, chart to $SVG" >&2
