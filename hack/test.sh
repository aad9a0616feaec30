#!/usr/bin/env bash
# Set-up, then the whole test suite. Tests need root, CRIU 4.2.1, runc and containerd;
# they fail (never skip) when a part is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
export PATH="/usr/local/sbin:$PATH"
# critest's tallies (tests/critest.rs: straight to containerd and through the
# shim), printed whatever the outcome.
summary="${CARGO_TARGET_DIR:-target}/tmp/critest/summary.txt"
rm -f "$summary"
trap 'if [ -f "$summary" ]; then echo "== critest"; cat "$summary"; fi' EXIT
# Tests start real containers and CRIU processes: keep their number bounded on 2 cores.
cargo test --workspace --locked -- --test-threads=2
