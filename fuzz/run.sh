#!/bin/sh
# Fuzzes the intake's form, params and webhook parsers with libFuzzer.
#
#     fuzz/run.sh [SECONDS]     (default 300)
#
# Installs cargo-fuzz if it is missing. cargo-fuzz needs nightly-only
# compiler flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
# Findings land in fuzz/artifacts/intake_form/; the corpus grows in
# fuzz/corpus/intake_form/ (both ignored by git).
set -eu
seconds="${1:-300}"
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
mkdir -p fuzz/corpus/intake_form
# Seeds: a real API送信 body and a webhook body.
printf 'proc_name=stock_send&params=%%7B%%22data%%22%%3A%%5B%%7B%%22table_name%%22%%3A%%22Stock%%22%%2C%%22rows%%22%%3A%%5B%%7B%%22storeId%%22%%3A%%221%%22%%7D%%5D%%7D%%5D%%7D&relay_secret=x' \
    > fuzz/corpus/intake_form/seed-stock-send
printf '{"event":"pos:stock","ids":[{"id":"1","productId":"113","storeId":"1"}]}' \
    > fuzz/corpus/intake_form/seed-webhook
RUSTC_BOOTSTRAP=1 cargo fuzz run intake_form fuzz/corpus/intake_form -- \
    -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048
