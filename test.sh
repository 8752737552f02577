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
# The S3 tests drive the real clients: the aws CLI and boto3 (PyPI), rclone and curl (Debian).
# A client that is missing fails its test with a message, so install them here.
if ! aws --version >/dev/null 2>&1 || ! python3 -c "import boto3" 2>/dev/null; then
    python3 -m pip install --quiet awscli boto3
fi
if ! command -v rclone >/dev/null || ! command -v curl >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq rclone curl >/dev/null
    else
        echo "test.sh: rclone and curl are needed (apt-get install rclone curl)" >&2
    fi
fi
# The NFS tests drive libnfs's client tools (Debian libnfs-utils: nfs-ls, nfs-cp, nfs-cat);
# this kernel has no NFS client, and none is needed.
if ! command -v nfs-ls >/dev/null || ! command -v nfs-cp >/dev/null || ! command -v nfs-cat >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq libnfs-utils >/dev/null
    else
        echo "test.sh: libnfs's tools are needed (apt-get install libnfs-utils)" >&2
    fi
fi
# The cluster fault tests (tests/tests/cluster_faults.rs) put each node in its own network
# namespace (`ip netns`, iproute2; as root) so a node can be cut off for real.
if ! command -v ip >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
    else
        echo "test.sh: iproute2 (ip) is needed for the cluster fault tests (apt-get install iproute2)" >&2
    fi
fi
# The Azure Blob tests start Azurite's blob service (npm) themselves; install it into a
# git-ignored folder of the repo (nodejs and npm from Debian if npm is missing). 3.35.0 is the
# release known to work with the SDK version and the Debian nodejs here.
if ! command -v npm >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
    else
        echo "test.sh: npm is needed for Azurite (apt-get install nodejs npm)" >&2
    fi
fi
if [ ! -x .peers/azurite/node_modules/.bin/azurite-blob ] && command -v npm >/dev/null; then
    mkdir -p .peers/azurite
    npm install --prefix .peers/azurite --no-audit --no-fund --loglevel=error azurite@3.35.0
fi
export TIDEPOOL_AZURITE_BIN="$PWD/.peers/azurite/node_modules/.bin/azurite-blob"
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi

# End-to-end tests start the real binary: build it first.
cargo build -p tidepool
cargo nextest run --workspace --no-fail-fast "$@"
