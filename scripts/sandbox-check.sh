#!/usr/bin/env bash
# Runs the package's check phase (nix/package.nix) the way `nix build` runs
# it inside the Nix build sandbox, on a machine without Nix:
#
#   - the sources nix/package.nix selects (Cargo.toml, Cargo.lock, crates/),
#     copied, with the dependencies vendored and cargo pointed at them
#     (what cargoSetupHook does), no registry, `--offline`;
#   - an unprivileged build user (nixbld1 if it exists, else nobody), all
#     capabilities dropped, HOME=/homeless-shelter (which does not exist),
#     an empty environment apart from what the builder sets;
#   - new network (loopback only, brought up), mount and PID namespaces:
#     no /etc/ssl (no trust store), a private /tmp, the test runner's shell
#     as PID 1 (it reaps orphans, as the builder's shell does);
#   - the command of nixpkgs' cargoCheckHook with NIX_BUILD_CORES=2:
#     `cargo test -j 2 [--profile <checkType>] --target <host> --offline
#     <cargoTestFlags> -- --test-threads=2 <checkFlags>`, with checkType,
#     cargoTestFlags and checkFlags read from nix/package.nix with its test
#     suite on (checks.package), so this script and the package cannot
#     disagree.
#
# The rustc is this machine's (rustup), not nixpkgs'.
#
# Usage (as root: it creates the namespaces, then drops to the build user):
#   scripts/sandbox-check.sh            build and test in target/sandbox-check
#   scripts/sandbox-check.sh --clean    start from an empty target directory
#   scripts/sandbox-check.sh --runs 5   run the tests 5 times (one build)
#
# It is a separate build (another --target layout, another user): the first
# run built for 35 minutes on a 2-core machine shared with seven other builds
# (load 15-18); the tests then take about 90 s, and later runs reuse the
# build. Inside, a self-check refuses to test as root, with an existing
# HOME, with anything in /etc/ssl or with a network link besides lo.
# Exits non-zero if any run failed.
#
# Environment:
#   NIXPKGS_LIB          nixpkgs' lib directory (default: ../shared/nix/nixpkgs/lib)
#   SANDBOX_CHECK_DIR    work directory (default: target/sandbox-check)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

clean=0
runs=1
while (($#)); do
  case $1 in
  --clean) clean=1 ;;
  --runs)
    runs=$2
    shift
    ;;
  *)
    echo "usage: $0 [--clean] [--runs N]" >&2
    exit 64
    ;;
  esac
  shift
done

if [[ $(id -u) -ne 0 ]]; then
  echo "sandbox-check: needs root (namespaces, mounts, switching to the build user)" >&2
  exit 77
fi
for tool in unshare setpriv ip nix-instantiate cargo rustc; do
  command -v "$tool" >/dev/null || {
    echo "sandbox-check: $tool not found" >&2
    exit 77
  }
done

lib=${NIXPKGS_LIB:-../shared/nix/nixpkgs/lib}
[[ -f $lib/default.nix ]] || {
  echo "sandbox-check: no nixpkgs lib at $lib (set NIXPKGS_LIB)" >&2
  exit 77
}
lib=$(cd "$lib" && pwd)

# checkType, cargoTestFlags and checkFlags as nix/package.nix gives them to
# buildRustPackage.
args=$(nix-instantiate --readonly-mode --eval --strict --json --expr "
  let
    lib = import $lib;
    stubs = import $repo/nix/stubs.nix { inherit lib; nixosLib = null; };
    package = (stubs.pkgsFor \"x86_64-linux\").callPackage $repo/nix/package.nix { runTests = true; };
  in
  { checkType = package.args.checkType or \"release\"; inherit (package.args) cargoTestFlags checkFlags; }
")
check_type=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["checkType"])' "$args")
mapfile -t check_flags < <(python3 -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])["checkFlags"]))' "$args")
mapfile -t test_flags < <(python3 -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])["cargoTestFlags"]))' "$args")
profile_flag=()
[[ $check_type == debug ]] || profile_flag=(--profile "$check_type")
host=$(rustc -vV | sed -n 's/^host: //p')

work=${SANDBOX_CHECK_DIR:-$repo/target/sandbox-check}
mkdir -p "$work"
work=$(cd "$work" && pwd)
user=nixbld1
getent passwd "$user" >/dev/null || user=nobody
group=$(id -gn "$user")

# The sources, as lib.fileset selects them in nix/package.nix.
rm -rf "$work/source"
mkdir -p "$work/source"
cp -a Cargo.toml Cargo.lock crates "$work/source/"
((clean)) && rm -rf "$work/target"
mkdir -p "$work/target" "$work/tmp" "$work/toolchain" "$work/cargo-home"

# The vendored dependencies and the cargo configuration that uses them.
echo "==> vendoring the dependencies (offline, from this machine's cargo cache)"
mkdir -p "$work/source/.cargo"
(cd "$work/source" && cargo vendor --offline --locked --quiet "$work/vendor" >/dev/null)
cat >"$work/source/.cargo/config.toml" <<CONFIG
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "$work/vendor"
CONFIG
chown -R "$user:$group" "$work/source" "$work/target" "$work/tmp" "$work/cargo-home"
chmod -R a+rX "$work/vendor"

sysroot=$(rustc --print sysroot)
inner_cmd=(cargo test -j 2 "${profile_flag[@]}" --target "$host" --offline "${test_flags[@]}" -- --test-threads=2 "${check_flags[@]}")
echo "==> in the sandbox as $user: ${inner_cmd[*]}"

# Runs inside the new namespaces, as root until setpriv.
# shellcheck disable=SC2016 # expanded by the inner shells
setup='
set -e
mount --make-rprivate /
mount -t tmpfs -o mode=755 none /etc/ssl
mount -t tmpfs -o mode=1777 none /tmp
mount --bind -o ro "$SYSROOT" "$WORK/toolchain"
ip link set lo up
exec unshare --pid --fork --mount-proc \
  setpriv --reuid="$BUILD_USER" --regid="$BUILD_GROUP" --clear-groups \
    --inh-caps=-all --bounding-set=-all --no-new-privs \
  env -i \
    HOME=/homeless-shelter \
    PATH="$WORK/toolchain/bin:/usr/bin:/bin" \
    TMPDIR="$WORK/tmp" TMP="$WORK/tmp" TEMP="$WORK/tmp" TEMPDIR="$WORK/tmp" \
    NIX_BUILD_CORES=2 \
    RUST_LOG= \
    CARGO_HOME="$WORK/cargo-home" \
    CARGO_TARGET_DIR="$WORK/target" \
    bash -c "bash \"$WORK/self-check.sh\" && cd \"$WORK/source\" && \"\$@\"; exit \$?" check "$@"
'

# Runs first inside the sandbox: refuses to test in an environment that is
# not the one this script promises.
cat >"$work/self-check.sh" <<'CHECK'
fail() {
  echo "sandbox: $*" >&2
  exit 1
}
[ "$(id -u)" != 0 ] || fail "running as root"
[ ! -e "$HOME" ] || fail "HOME=$HOME exists"
[ -z "$(ls -A /etc/ssl)" ] || fail "/etc/ssl is not empty"
links=$(awk -F: 'NR > 2 { gsub(/ /, "", $1); print $1 }' /proc/net/dev)
[ "$links" = lo ] || fail "network links besides lo: $links"
echo "sandbox: uid $(id -u), HOME=$HOME absent, /etc/ssl empty, network links: $links, PID $$"
CHECK
chmod a+r "$work/self-check.sh"

failed=0
for ((run = 1; run <= runs; run++)); do
  log="$work/run-$run.log"
  start=$(date +%s)
  if WORK="$work" SYSROOT="$sysroot" BUILD_USER="$user" BUILD_GROUP="$group" \
    unshare --mount --net --fork bash -c "$setup" setup "${inner_cmd[@]}" >"$log" 2>&1; then
    result=passed
  else
    result=FAILED
    failed=$((failed + 1))
  fi
  took=$(($(date +%s) - start))
  summary=$(grep -E '^test result:' "$log" | awk '{p += $4; f += $6; i += $8} END {print p " passed, " f " failed, " i " ignored"}')
  build=$(sed -n 's/^ *Finished .* in \(.*\)$/build \1, /p' "$log" | head -n 1)
  echo "run $run/$runs: $result in ${took}s (${build}$summary; log: $log)"
  if [[ $result == FAILED ]]; then
    grep -E '^(sandbox:|failures:|    [a-z_:0-9]+$|test .* FAILED|error)' "$log" | head -n 40 | sed 's/^/    /' || true
  fi
done
((failed == 0))
