#!/usr/bin/env bash
# Runs every check of the project: formatting, lints, the whole test suite
# (unit, integration with the real binaries, the systemd-nspawn test) and the
# static Nix checks. On a fresh Debian 12 machine with only Rust installed it
# first installs what it needs (apt packages as root or through sudo, cargo
# tools with `cargo install --locked`). CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- prerequisites ---------------------------------------------------------
apt_packages=()
command -v git >/dev/null || apt_packages+=(git)
command -v python3 >/dev/null || apt_packages+=(python3)
# Signed-commit tests sign and verify with the real tools (tests/trust.rs).
command -v ssh-keygen >/dev/null || apt_packages+=(openssh-client)
command -v gpg >/dev/null || apt_packages+=(gnupg)
command -v nix-instantiate >/dev/null || apt_packages+=(nix-bin)
# Lints the NixOS VM tests' Python scripts (nix/check.sh).
python3 -c 'import pyflakes' 2>/dev/null || /usr/bin/python3 -c 'import pyflakes' 2>/dev/null ||
  apt_packages+=(python3-pyflakes)
command -v debootstrap >/dev/null || apt_packages+=(debootstrap)
command -v systemd-nspawn >/dev/null || apt_packages+=(systemd-container)
# The mock dashboard's page is tested in a real headless browser, driven over
# the DevTools protocol (so no chromium-driver is needed).
command -v chromium >/dev/null || apt_packages+=(chromium)
# The agent's metrics file is tested through the real node exporter's
# textfile collector (tests/metrics_textfile.rs).
command -v prometheus-node-exporter >/dev/null || apt_packages+=(prometheus-node-exporter)
if [ ${#apt_packages[@]} -gt 0 ]; then
  step "installing ${apt_packages[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

cargo_tool() { # binary crate@version
  command -v "$1" >/dev/null || { step "installing $2"; cargo install --locked --quiet "$2"; }
}
cargo_tool nixfmt nixfmt_rs@0.5.3
cargo_tool deadnix deadnix@1.3.1
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy

# --- checks ----------------------------------------------------------------
# CI builds once from scratch: incremental caches would only double
# target/ (about 2 GB). The disk is printed first and last so a run that
# dies of a full disk (a linker killed by SIGBUS) says so in its log.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
disk() { df -h --output=avail,target . | tail -n 1 | awk '{print "disk: " $1 " free on " $2}'; }
step "$(disk); target/ $(du -sh target 2>/dev/null | cut -f1 || echo none)"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test --workspace"
cargo test --workspace --all-targets

step "fuzzing, CI-sized (scripts/fuzz.sh 10: 10 s per target)"
bash scripts/fuzz.sh 10

step "Nix static checks"
bash nix/check.sh

# The package's check phase as the Nix build sandbox runs it: a second
# build of the workspace (another target layout), so only on request.
if [ "${NIXFLEET_SANDBOX_CHECK:-0}" = 1 ]; then
  step "the package's check phase in a sandbox like Nix's (scripts/sandbox-check.sh)"
  as_root bash scripts/sandbox-check.sh
fi

step "demo (scripts/demo.sh --check)"
NIXFLEET_DEMO_PORT="${NIXFLEET_DEMO_PORT:-18000}" bash scripts/demo.sh --check

# 50 real agents, a dashboard restart and a test to all (issue 25): it prints
# figures and fails only when the fleet does not come back at all.
step "a fleet of 50 agents (scripts/fleet.sh 50; figures only, never fails on timing)"
bash scripts/fleet.sh 50

# Timings are noisy, so the benchmark never decides pass or fail; the quick
# run only keeps it from rotting (issue 5).
step "benchmark, quick mode (figures only, never fails the run)"
cargo bench-agent --quick || echo "warning: the quick benchmark failed (not counted as a test failure)"

step "done; $(disk); target/ $(du -sh target 2>/dev/null | cut -f1)"
