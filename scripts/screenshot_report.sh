#!/usr/bin/env bash
# Render DIR/report.html in headless Chromium (Debian's `chromium` package) and save
# DIR/report.png, to look at the page as a person would:
#   scripts/screenshot_report.sh multirun/default/<time> [OUT.png] [WIDTHxHEIGHT]
# Install the browser once with: apt-get update && apt-get install -y chromium
set -euo pipefail
dir="${1:?usage: $0 SWEEP_DIR [OUT.png] [WIDTHxHEIGHT]}"
html="$(cd "$dir" && pwd)/report.html"
out="${2:-$dir/report.png}"
size="${3:-1280x2400}"
[ -f "$html" ] || { echo "error: $html does not exist; run sparsebench-report $dir first" >&2; exit 2; }
browser="$(command -v chromium || command -v chromium-browser || true)"
[ -n "$browser" ] || { echo "error: chromium not found; apt-get install -y chromium" >&2; exit 2; }
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
# No network, no first-run work: the page is self-contained, so nothing should be fetched.
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --screenshot="$(realpath -m "$out")" \
  --window-size="${size/x/,}" "file://$html" >/dev/null 2>&1
[ -s "$out" ] || { echo "error: chromium wrote no screenshot to $out" >&2; exit 1; }
echo "$out"
