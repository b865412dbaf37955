#!/usr/bin/env bash
# The main job, on one machine: starts nixfleet-mock-dashboard and an agent
# against it on loopback, then shows what the dashboard sees of the host
# (a status line every few seconds, command output and results as they
# arrive) until Ctrl-C.
#
#   scripts/demo.sh            run until Ctrl-C (dashboard on 127.0.0.1:8000)
#   scripts/demo.sh --check    stop once the host is online with two
#                              heartbeats and a `pull` succeeded (CI)
#
# Environment:
#   NIXFLEET_DEMO_PORT     dashboard port (default 8000)
#   NIXFLEET_DEMO_REBUILD  the nixos-rebuild that `switch` runs (default: a
#                          stand-in that replays a recorded Nix build log,
#                          two downloads and two builds; see README)
#
# Release binaries (target/release) are used when both exist and are newer
# than every source file; otherwise the debug ones are built (incremental).
#
# Everything lives in a temporary directory: the token, a bare "origin"
# repository and its clone (the agent's repo_dir, so `pull` works), the
# agent's and the dashboard's logs, and the command logs under state/logs/.
# Ctrl-C stops both programs and keeps that directory (its path is printed);
# --check removes it when the check passed.
set -euo pipefail
cd "$(dirname "$0")/.."

check_only=false
[ "${1:-}" = "--check" ] && check_only=true
port="${NIXFLEET_DEMO_PORT:-8000}"
host="$(hostname)"

command -v python3 >/dev/null || { echo "demo.sh needs python3 (apt-get install python3)" >&2; exit 1; }
command -v git >/dev/null || { echo "demo.sh needs git (apt-get install git)" >&2; exit 1; }
echo "the dashboard page will be at http://127.0.0.1:$port/ (open it in a browser; on another machine: ssh -L $port:127.0.0.1:$port <this host>)"

work=""
pids=()
cleanup() {
  local status=$?
  trap - INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -n "$work" ] || return 0
  if $check_only && [ "$status" -eq 0 ]; then
    rm -rf "$work"
  else
    echo
    echo "stopped; logs kept in $work:"
    echo "  agent.log, dashboard.log, state/logs/ (one log per command)"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Whether target/release holds both binaries, each newer than every source
# (a build there would change nothing, and debug builds take minutes).
release_is_current() {
  local bin
  for bin in nixfleet-agent nixfleet-mock-dashboard; do
    [ -x "target/release/$bin" ] || return 1
    [ -z "$(find crates Cargo.toml Cargo.lock -newer "target/release/$bin" -type f -print -quit)" ] || return 1
  done
}

if release_is_current; then
  bin=target/release
  echo "using the release binaries in $bin (newer than the sources)"
else
  bin=target/debug
  if [ -x "$bin/nixfleet-agent" ] && [ -x "$bin/nixfleet-mock-dashboard" ]; then
    echo "building nixfleet-agent and nixfleet-mock-dashboard (seconds when nothing changed) ..."
  else
    echo "building nixfleet-agent and nixfleet-mock-dashboard for the first time:"
    echo "cargo compiles about 130 crates, several minutes on a 2-core machine (README:"
    echo "\"How long it takes here\"); later runs take seconds."
  fi
  started=$SECONDS
  cargo build --workspace --bins
  echo "built in $((SECONDS - started)) s"
fi

work="$(mktemp -d -t nixfleet-demo.XXXXXX)"

# A fresh token, readable only by us, never on a command line.
umask 077
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/token"
umask 022

"$bin/nixfleet-mock-dashboard" --listen "127.0.0.1:$port" --token-file "$work/token" \
  > "$work/dashboard.out" 2> "$work/dashboard.log" &
pids+=($!)
for _ in $(seq 100); do
  grep -q '^listening on' "$work/dashboard.out" 2>/dev/null && break
  kill -0 "${pids[0]}" 2>/dev/null || break
  sleep 0.1
done
if ! grep -q '^listening on' "$work/dashboard.out"; then
  echo "the mock dashboard did not start (is port $port in use? set NIXFLEET_DEMO_PORT):" >&2
  tail -n 5 "$work/dashboard.log" >&2
  exit 1
fi
echo "mock dashboard: http://127.0.0.1:$port/ (the live page; API: /api/hosts, /api/hosts/$host/messages)"

# A small configuration repository, so generation, `pull` and `test` show
# something: a bare "origin" and the agent's clone of it.
git_quiet() { git -c user.name=demo -c user.email=demo@example.invalid -c init.defaultBranch=main "$@" >/dev/null; }
seed="$work/seed"
mkdir -p "$seed/hosts/$host/tests"
printf '#!/bin/sh\necho "hello from a host test"\n' > "$seed/hosts/$host/tests/T01-hello.sh"
chmod +x "$seed/hosts/$host/tests/T01-hello.sh"
git_quiet -C "$seed" init -q -b main
git_quiet -C "$seed" add .
git_quiet -C "$seed" commit -q -m "demo config"
git_quiet clone -q --bare "$seed" "$work/origin.git"
git_quiet clone -q "$work/origin.git" "$work/repo"
rm -rf "$seed"

# `switch` runs nixos-rebuild. The demo's repository is not a NixOS
# configuration, so by default a labelled stand-in plays nixos-rebuild.
# Asked for Nix's structured log (as the agent does for switch and boot),
# it replays a recorded one, paced, so the dashboard shows the rendered
# build log and live build progress.
mkdir -p "$work/bin"
if [ -n "${NIXFLEET_DEMO_REBUILD:-}" ]; then
  rebuild="$(command -v "$NIXFLEET_DEMO_REBUILD")" ||
    { echo "NIXFLEET_DEMO_REBUILD=$NIXFLEET_DEMO_REBUILD: no such program" >&2; exit 1; }
  ln -s "$rebuild" "$work/bin/nixos-rebuild"
  echo "switch runs: $NIXFLEET_DEMO_REBUILD"
else
  recording="$PWD/crates/nixfleet-agent/tests/fixtures/nix-log/mixed.log"
  cat > "$work/bin/nixos-rebuild" <<STANDIN
#!/bin/sh
echo "[demo stand-in] nixos-rebuild \$*"
case " \$* " in
  *" --log-format internal-json "*)
    while IFS= read -r line; do printf '%s\n' "\$line" >&2; sleep 0.05; done < '$recording' ;;
  *) for i in 1 2 3 4 5; do echo "building step \$i/5"; sleep 1; done ;;
esac
echo "[demo stand-in] done"
STANDIN
  chmod +x "$work/bin/nixos-rebuild"
fi

cat > "$work/agent.toml" <<TOML
url = "ws://127.0.0.1:$port/ws"
token_file = "$work/token"
repo_dir = "$work/repo"
state_dir = "$work/state"
hostname = "$host"
interval = 2
TOML
PATH="$work/bin:$PATH" "$bin/nixfleet-agent" --config "$work/agent.toml" 2> "$work/agent.log" &
pids+=($!)
echo "agent: pid ${pids[1]}, log $work/agent.log"
if ! $check_only; then
  echo "try:   curl -s -XPOST 127.0.0.1:$port/api/hosts/$host/command -d '{\"command\": \"switch\"}'"
  echo "       (also pull, test, pull-switch, stop); Ctrl-C to end"
fi
echo

python3 - "$port" "$host" "$check_only" <<'PY'
import json, sys, time, urllib.request

port, host, check_only = sys.argv[1], sys.argv[2], sys.argv[3] == "true"
base = f"http://127.0.0.1:{port}"


def get(path):
    with urllib.request.urlopen(base + path, timeout=5) as r:
        return json.load(r)


def post(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def ago(ms):
    if ms is None:
        return "never"
    return f"{max(0, round(time.time() - ms / 1000))}s ago"


def status_line(h):
    beat = h.get("last_heartbeat") or {}
    parts = [host, "online" if h["online"] else "offline"]
    parts.append(f"gen {beat.get('generation') or (h.get('register') or {}).get('generation') or '-'}")
    parts.append(f"heartbeat {ago(h.get('last_heartbeat_at'))}")
    metrics = beat.get("metrics")
    if metrics:
        parts.append(f"cpu {metrics['cpu']:.0f}%  ram {metrics['ram']:.0f}%  load {metrics['load']:.2f}")
    command = beat.get("pending_command")
    parts.append(f"running {command} (pid {beat.get('command_pid')})" if command else "idle")
    system = (h.get("progress") or {}).get("system")
    # Progress belongs to the running command: the last build's counts
    # would otherwise repeat until the next command.
    if command and system:
        builds = (system.get("detail") or {}).get("builds") or {}
        parts.append(f"build {system.get('current')}/{system.get('total')} {system.get('status')}"
                     f" ({builds.get('done', 0)}/{builds.get('expected', 0)} derivations)")
    return "  ".join(parts)


def show(message):
    p = message.get("payload") or {}
    kind = message["type"]
    if kind == "output":
        print(f"  {p.get('command')} {'!' if p.get('is_error') else '|'} {p.get('line')}")
    elif kind == "status":
        text = f" ({p['message']})" if p.get("message") else ""
        print(f"  {p.get('command')}: {p.get('status')}, exit {p.get('exit_code')}{text}")
    elif kind == "command_rejected":
        print(f"  rejected: {p.get('reason')}")
    elif kind == "test_progress":
        print(f"  test {p.get('current')}/{p.get('total')}, {p.get('passed')} passed")


def run():
    deadline = time.time() + 30
    since, next_line, pulled = 0, 0.0, None
    while True:
        try:
            h = {x["hostname"]: x for x in get("/api/hosts")}.get(host)
            if h is None:
                print(f"{time.strftime('%H:%M:%S')}  waiting for {host} to register ...", flush=True)
            else:
                news = get(f"/api/hosts/{host}/messages?since={since}")
                since = news["next"]
                for m in news["messages"]:
                    if m["type"] in ("output", "status", "command_rejected", "test_progress"):
                        show(m)
                        if check_only and m["type"] == "status" and m["payload"]["command"] == "pull":
                            pulled = m["payload"]
                if time.time() >= next_line:
                    print(f"{time.strftime('%H:%M:%S')}  {status_line(h)}", flush=True)
                    next_line = time.time() + 3
                if check_only:
                    beats = get(f"/api/hosts/{host}/messages?type=heartbeat")["messages"]
                    if h["online"] and len(beats) >= 2 and pulled is None:
                        post(f"/api/hosts/{host}/command", {"command": "pull"})
                        pulled = {}
                    if pulled and pulled.get("status") == "ok":
                        print("demo check passed: the host is online with heartbeats, and pull works")
                        return 0
                    if pulled and pulled.get("status") == "error":
                        print(f"demo check failed: pull: {pulled.get('message')}")
                        return 1
        except OSError as e:
            print(f"dashboard not answering: {e}", flush=True)
        if check_only and time.time() > deadline:
            print("demo check failed: no heartbeats and successful pull within 30 s")
            return 1
        time.sleep(0.5)


try:
    sys.exit(run())
except KeyboardInterrupt:
    sys.exit(130)
PY
