#!/usr/bin/env bash
# The long reliability run (about 30 minutes on 2 cores), beyond what CI runs:
#   - 1,000 connect/disconnect cycles against the real agent (CI runs 100):
#     RSS must end within 1 MiB of where it started, no descriptor leaked;
#     each cycle costs the protocol's minimum reconnect backoff (1 s);
#   - the property tests with 50x their CI case counts;
#   - 5 minutes of fuzzing per target (scripts/fuzz.sh 300).
# Prints the figures (lines starting with "figures:" and "fuzz ").
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> property tests, PROPTEST_CASES=12800 (50x)"
PROPTEST_CASES=12800 cargo test --quiet -p nixfleet-agent --test properties

echo "==> 1,000 connect/disconnect cycles"
NIXFLEET_FAULT_FULL_BACKOFF=1 NIXFLEET_FAULT_CYCLES=1000 cargo test --quiet -p nixfleet-agent --test faults connect_disconnect -- --nocapture 2>&1 \
  | grep -E '^figures:|test result|panicked|FAILED'

echo "==> fuzzing"
bash scripts/fuzz.sh 300
