#!/usr/bin/env bash
# Static checks of the Nix side of NixFleet: what can be verified without a
# Nix store or Nixpkgs (nix build, nix flake check and the VM tests need a
# NixOS machine). Prints one line per check, "ok: …", "FAIL: …" or
# "skipped: …", and exits non-zero if any check failed.
#
# Tools (installed by the caller, never by this script):
#   nix-instantiate  Debian's nix-bin (Nix 2.8 is enough)
#   nixfmt           crates.io nixfmt_rs, or nixpkgs' nixfmt
#   deadnix          crates.io deadnix
#   python3
#   pyflakes         optional (python3 -m pyflakes), lints the VM test scripts
#
# Environment:
#   NIXPKGS_LIB   nixpkgs' `lib` directory (default: ../shared/nix/nixpkgs/lib
#                 beside the repository, as CI has it); the lib-only
#                 evaluations are skipped only when neither exists
#   NIXOS_LIB     nixpkgs' `nixos/lib` directory with the systemd unit
#                 options and rendering (default: $NIXPKGS_LIB/../nixos/lib)
#   NIXPKGS_PIN   a nixpkgs lock node verified elsewhere (JSON with `locked`
#                 and `original`), for comparing flake.lock's nixpkgs node
#                 with it. Default: ../shared/nix/nixpkgs-pin.json, a file
#                 beside the repository on the machine it was developed on;
#                 where it does not exist (a fresh clone) the comparison
#                 prints "skipped: …" and only flake.lock's structure is
#                 checked.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

failures=0
ok() { echo "ok: $*"; }
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}
skip() { echo "skipped: $*"; }
indent() { sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/    /'; }

have() {
  if command -v "$1" >/dev/null 2>&1; then
    return 0
  fi
  fail "$1 not found: $2"
  return 1
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Every Nix file of the repository: tracked or new, not ignored (target/,
# result links).
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t nix_files < <(git ls-files --cached --others --exclude-standard -- '*.nix' | sort -u)
else
  mapfile -t nix_files < <(find . -name '*.nix' -not -path './target/*' -not -path './.git/*' | sort)
fi
existing=()
for f in "${nix_files[@]}"; do
  [[ -f $f ]] && existing+=("$f")
done
nix_files=("${existing[@]}")
if ((${#nix_files[@]} == 0)); then
  fail "no .nix files found"
  exit 1
fi

# (i) syntax
if have nix-instantiate "install Debian's nix-bin (apt-get install nix-bin)"; then
  bad=0
  for f in "${nix_files[@]}"; do
    if ! out=$(nix-instantiate --parse "$f" 2>&1 >/dev/null); then
      fail "nix-instantiate --parse $f"
      echo "$out" | indent
      bad=1
    fi
  done
  ((bad)) || ok "${#nix_files[@]} .nix files parse (nix-instantiate --parse)"
fi

# (ii) formatting, RFC 166 style
if have nixfmt "install it with: cargo install --locked nixfmt_rs"; then
  if out=$(nixfmt --check "${nix_files[@]}" 2>&1); then
    ok "nixfmt --check ($(nixfmt --version 2>&1 | head -n1))"
  else
    fail "nixfmt --check: run nixfmt on these files"
    echo "$out" | indent
  fi
fi

# (iii) dead code
if have deadnix "install it with: cargo install --locked deadnix"; then
  if out=$(deadnix --fail "${nix_files[@]}" 2>&1); then
    ok "deadnix --fail ($(deadnix --version 2>&1 | head -n1))"
  else
    fail "deadnix --fail"
    echo "$out" | indent
  fi
fi

# (iv) flake.lock: exactly the pinned nixpkgs node, and nothing else
pin=${NIXPKGS_PIN:-../shared/nix/nixpkgs-pin.json}
if have python3 "install python3"; then
  if out=$(python3 - flake.lock "$pin" 2>&1 <<'EOF'
import json
import os
import sys

lock_path, pin_path = sys.argv[1], sys.argv[2]
lock = json.load(open(lock_path))
problems = []
if lock.get("version") != 7:
    problems.append(f"version is {lock.get('version')!r}, not 7")
if lock.get("root") != "root":
    problems.append("root node is not called root")
nodes = lock.get("nodes", {})
if sorted(nodes) != ["nixpkgs", "root"]:
    problems.append(f"nodes are {sorted(nodes)}, expected nixpkgs and root only")
if nodes.get("root") != {"inputs": {"nixpkgs": "nixpkgs"}}:
    problems.append(f"root node is {nodes.get('root')}")
node = nodes.get("nixpkgs", {})
if sorted(node) != ["locked", "original"]:
    problems.append(f"nixpkgs node has keys {sorted(node)}, expected locked and original")
if os.path.exists(pin_path):
    pin = json.load(open(pin_path))
    for key in ("locked", "original"):
        if node.get(key) != pin[key]:
            problems.append(f"nixpkgs.{key} differs from {pin_path}: {node.get(key)} != {pin[key]}")
    source = "pinned"
else:
    source = "no pin"
if problems:
    print("\n".join(problems))
    sys.exit(1)
print(source)
EOF
  ); then
    ok "flake.lock: version 7, nixpkgs as the only input"
    if [[ $out == pinned ]]; then
      ok "flake.lock: the nixpkgs node equals the pin $pin"
    else
      skip "flake.lock's nixpkgs node not compared with a pin: no pin file at $pin (set NIXPKGS_PIN)"
    fi
  else
    fail "flake.lock"
    echo "$out" | indent
  fi
fi

# (iv c) docs/nixos.md documents exactly the module's options (textual:
# the option declarations at the top level of services.nixfleet).
if out=$(
  python3 - modules/nixfleet.nix docs/nixos.md <<'EOF'
import re, sys
module, doc = open(sys.argv[1]).read(), open(sys.argv[2]).read()
declared = set(re.findall(r"^    ([\w.]+) = lib\.mk(?:Option|EnableOption|PackageOption)\b", module, re.M))
options = doc.split("\n## Options\n", 1)[-1].split("\n## ", 1)[0]
documented = set(re.findall(r"^\| `([\w.]+)` \|", options, re.M))
problems = [f"option {o} is not in docs/nixos.md's Options table" for o in sorted(declared - documented)]
problems += [f"docs/nixos.md documents {o}, which the module does not declare" for o in sorted(documented - declared)]
if problems or not declared:
    print("\n".join(problems) or "no options found in the module")
    sys.exit(1)
print(len(declared))
EOF
); then
  ok "docs/nixos.md documents the module's $out options"
else
  fail "docs/nixos.md and modules/nixfleet.nix disagree"
  echo "$out" | indent
fi

# (v) lib-only evaluation of the module, the package and the flake
report() {
  # Prints the results of an eval-*.nix run; returns 1 if any failed.
  python3 - "$1" "$2" <<'EOF'
import json
import sys

label, path = sys.argv[1], sys.argv[2]
results = json.load(open(path))["results"]
failed = [r for r in results if not r["ok"]]
for r in failed:
    print(f"FAIL: {label}: {r['name']}: {r['detail']}")
if not failed:
    print(f"ok: {label}: {len(results)} expectations hold")
sys.exit(1 if failed else 0)
EOF
}

evaluate() {
  # evaluate NAME FILE OUT [ARGS…]: nix-instantiate a nix/eval-*.nix file to JSON.
  local err
  if err=$(nix-instantiate --readonly-mode --eval --strict --json "$2" \
    --arg lib "import $NIXPKGS_LIB" --arg nixosLib "$NIXOS_LIB" "${@:4}" 2>&1 >"$3"); then
    return 0
  fi
  fail "$1: evaluation failed"
  echo "$err" | indent
  return 1
}

render_unit() {
  # render_unit MODULE: the unit NixOS writes for MODULE (nix/render-unit.nix).
  nix-instantiate --readonly-mode --eval --strict --json nix/render-unit.nix \
    --arg lib "import $NIXPKGS_LIB" --arg nixosLib "$NIXOS_LIB" --arg module "$1"
}

if [[ -z ${NIXPKGS_LIB:-} && -f ../shared/nix/nixpkgs/lib/default.nix ]]; then
  NIXPKGS_LIB=../shared/nix/nixpkgs/lib
fi
if [[ -z ${NIXPKGS_LIB:-} ]]; then
  skip "no nixpkgs lib: NIXPKGS_LIB not set and no ../shared/nix/nixpkgs/lib (lib-only evaluation of the module, the package, the unit, the flake outputs and the VM test scripts)"
elif [[ ! -f $NIXPKGS_LIB/default.nix ]]; then
  fail "NIXPKGS_LIB=$NIXPKGS_LIB is not a nixpkgs lib directory (no default.nix)"
elif [[ ! -f ${NIXOS_LIB:-$NIXPKGS_LIB/../nixos/lib}/systemd-lib.nix ]]; then
  fail "no nixos/lib with systemd-lib.nix at ${NIXOS_LIB:-$NIXPKGS_LIB/../nixos/lib}: set NIXOS_LIB to nixpkgs' nixos/lib"
elif have nix-instantiate "install Debian's nix-bin" && have python3 "install python3"; then
  NIXOS_LIB=$(cd "${NIXOS_LIB:-$NIXPKGS_LIB/../nixos/lib}" && pwd)
  NIXPKGS_LIB=$(cd "$NIXPKGS_LIB" && pwd)

  if evaluate "module and package" nix/eval-module.nix "$tmp/module.json"; then
    report "module and package (nix/eval-module.nix)" "$tmp/module.json" || failures=$((failures + 1))
  fi

  # The unit NixOS writes for the module: NixOS's own service option types
  # check the definition and systemd-lib renders it (the text the
  # systemd-nspawn test installs).
  if err=$(render_unit "$PWD/modules/nixfleet.nix" 2>&1 >"$tmp/unit.json"); then
    ok "the module's unit passes NixOS's systemd types and renders with systemd-lib ($(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1])).splitlines()))' "$tmp/unit.json") lines, nix/render-unit.nix)"
  else
    fail "the module's unit (nix/render-unit.nix)"
    echo "$err" | indent
  fi

  # Self-test of that check: deliberately broken copies of the module must
  # be refused, each with the error NixOS itself would give.
  broken_cases=(
    "a misspelt service attribute"
    "restartIfChanged = false;" "restartIfChange = false;"
    "The option \`systemd.services.nixfleet.restartIfChange' does not exist"

    "a wrong type"
    'wants = [ "network-online.target" ];' 'wants = "network-online.target";'
    "\`systemd.services.nixfleet.wants' is not of type \`list of"

    "an invalid Type="
    'Type = "notify";' 'Type = "notify-ready";'
    "Systemd Service field \`Type' cannot have value \`notify-ready'"

    "an invalid Restart="
    'Restart = "always";' 'Restart = "allways";'
    "Systemd Service field \`Restart' cannot have value \`allways'"
  )
  refused=()
  for ((i = 0; i < ${#broken_cases[@]}; i += 4)); do
    what=${broken_cases[i]}
    copy="$tmp/broken-$((i / 4)).nix"
    if ! python3 - modules/nixfleet.nix "$copy" "${broken_cases[i + 1]}" "${broken_cases[i + 2]}" <<'EOF'; then
import sys
source, target, old, new = sys.argv[1:]
text = open(source).read()
if text.count(old) != 1:
    sys.exit(f"the module no longer has exactly one {old!r}")
open(target, "w").write(text.replace(old, new))
EOF
      fail "self-test of the unit check: cannot make a copy with $what"
      continue
    fi
    if err=$(render_unit "$copy" 2>&1 >/dev/null); then
      fail "self-test of the unit check: a module with $what was accepted"
    elif [[ $err != *"${broken_cases[i + 3]}"* ]]; then
      fail "self-test of the unit check: a module with $what failed, but not with: ${broken_cases[i + 3]}"
      echo "$err" | indent
    else
      refused+=("$what")
    fi
  done
  if ((${#refused[@]} == ${#broken_cases[@]} / 4)); then
    ok "self-test: the unit check refuses a module with $(
      IFS=,
      echo "${refused[*]}" | sed 's/,/, /g'
    )"
  fi

  # The rebuild VM test's configuration repository as the VM lays it out,
  # with stand-ins for the two files that only the VM has: its generated
  # hardware configuration and NixOS's test instrumentation.
  repo="$tmp/rebuild-repo"
  mkdir -p "$repo/modules/testing"
  cp nixos-tests/rebuild/repo-flake.nix "$repo/flake.nix"
  cp nixos-tests/rebuild/configuration.nix nixos-tests/rebuild/common.nix "$repo/"
  echo '{ }' >"$repo/hardware-configuration.nix"
  echo '{ }' >"$repo/modules/testing/test-instrumentation.nix"

  if evaluate "flake outputs" nix/eval-flake.nix "$tmp/flake.json" --argstr rebuildRepo "$repo"; then
    report "flake outputs (nix/eval-flake.nix)" "$tmp/flake.json" || failures=$((failures + 1))

    # The VM tests' Python, as the test driver would see it: its globals
    # (machines and driver functions) declared first.
    # Debian's python3-pyflakes lives with the system Python, which may not
    # be the first python3 on PATH (pyenv, a venv).
    py=python3
    if ! python3 -c 'import pyflakes' 2>/dev/null && /usr/bin/python3 -c 'import pyflakes' 2>/dev/null; then
      py=/usr/bin/python3
    fi
    if out=$("$py" - "$tmp/flake.json" "$tmp" 2>&1 <<'EOF'
import json
import os
import py_compile
import subprocess
import sys

scripts = json.load(open(sys.argv[1]))["testScripts"]
tmp = sys.argv[2]
try:
    import pyflakes  # noqa: F401

    lint = True
except ImportError:
    lint = False
driver_globals = ["start_all", "subtest", "retry", "join_all", "log", "machines", "driver"]
problems = []
for name, test in sorted(scripts.items()):
    path = os.path.join(tmp, f"{name}.py")
    with open(path, "w") as f:
        for glob in driver_globals + test["nodes"]:
            f.write(f"{glob}: object = None  # declared by the test driver\n")
        f.write(test["script"])
    try:
        py_compile.compile(path, doraise=True)
    except py_compile.PyCompileError as error:
        problems.append(f"{name}: {error.msg}")
        continue
    if lint:
        run = subprocess.run(
            [sys.executable, "-m", "pyflakes", path], capture_output=True, text=True
        )
        if run.returncode != 0:
            problems.append(f"{name}:\n{run.stdout}{run.stderr}")
if problems:
    print("\n".join(problems))
    sys.exit(1)
print(("compile and pyflakes-clean" if lint else "compile (pyflakes not installed)") + ": " + ", ".join(sorted(scripts)))
EOF
    ); then
      ok "VM test scripts $out"
    else
      fail "VM test scripts"
      echo "$out" | indent
    fi
  fi
fi

if ((failures)); then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all Nix checks passed"
