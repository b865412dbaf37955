#!/usr/bin/env bash
# Fuzzes the agent's hostile-input paths with cargo-fuzz (libFuzzer):
#   decode  inbound frame text -> protocol::decode -> the command lookup
#   config  TOML file + environment + token placement -> config::load_with
# (fuzz/fuzz_targets/*.rs say what each checks besides "never panics").
#
#   scripts/fuzz.sh             10 s per target (what CI runs: scripts/test.sh)
#   scripts/fuzz.sh 300         5 min per target (the documented long run)
#   scripts/fuzz.sh 60 decode   one target
#
# Works on stable Rust (RUSTC_BOOTSTRAP=1 unlocks the sanitizer flags that
# cargo-fuzz passes); installs cargo-fuzz if missing. The corpus grows in
# fuzz/corpus/ (not committed); fuzz/seeds/ is the committed starting point.
# Prints, per target, how many inputs were tried; exits non-zero on a
# finding (the input is saved under fuzz/artifacts/).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-10}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode config)

command -v cargo-fuzz >/dev/null || cargo install --locked --quiet cargo-fuzz@0.13.2
export RUSTC_BOOTSTRAP=1

max_len() {
  case "$1" in
    decode) echo 65536 ;;
    *) echo 8192 ;;
  esac
}

echo "==> building the fuzz targets"
cargo fuzz build 2>&1 | tail -n 3
summary=()
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  log="$(mktemp)"
  echo "==> fuzzing $target for ${seconds}s"
  if ! cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
      -dict="dict/$target.dict" -max_len="$(max_len "$target")" \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz $target: FOUND A PROBLEM (see above and fuzz/artifacts/$target/)" >&2
    exit 1
  fi
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  corpus="$(ls "corpus/$target" | wc -l)"
  rm -f "$log"
  summary+=("fuzz $target: ${runs:-?} inputs in ${seconds}s, no crash, no failed check (corpus: $corpus files)")
done
printf '%s\n' "${summary[@]}"
