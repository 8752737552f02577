#!/usr/bin/env bash
# The whole test suite, installing what it needs. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v cargo >/dev/null; then
    echo "test.sh: cargo is needed (install Rust with rustup)" >&2
    exit 1
fi
# Loop-device tests of the NVMe engine need losetup (util-linux) and root; without them
# those cases print that they were skipped and the rest runs.
if ! command -v losetup >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq util-linux >/dev/null
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi

# End-to-end tests start the real binary: build it first.
cargo build -p tidepool
cargo nextest run --workspace --no-fail-fast "$@"
