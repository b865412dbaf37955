#!/usr/bin/env bash
# The main job, on one machine: starts nixfleet-mock-dashboard and an agent
# against it on loopback, then shows what the dashboard knows about the host
# every few seconds until Ctrl-C.
#
#   scripts/demo.sh            run until Ctrl-C (dashboard on 127.0.0.1:8000)
#   scripts/demo.sh --check    stop once the host is online with two heartbeats
#
# Environment: NIXFLEET_DEMO_PORT (default 8000).
set -euo pipefail
cd "$(dirname "$0")/.."

check_only=false
[ "${1:-}" = "--check" ] && check_only=true
port="${NIXFLEET_DEMO_PORT:-8000}"
host="$(hostname)"

command -v python3 >/dev/null || { echo "demo.sh needs python3 (apt-get install python3)" >&2; exit 1; }
echo "building nixfleet-agent and nixfleet-mock-dashboard ..."
cargo build --quiet --workspace --bins

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A fresh token, readable only by us, never on a command line.
umask 077
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/token"
umask 022

target/debug/nixfleet-mock-dashboard --listen "127.0.0.1:$port" --token-file "$work/token" \
  > "$work/dashboard.out" 2> "$work/dashboard.log" &
pids+=($!)
for _ in $(seq 100); do
  grep -q '^listening on' "$work/dashboard.out" 2>/dev/null && break
  sleep 0.1
done
grep -q '^listening on' "$work/dashboard.out" || { cat "$work/dashboard.log" >&2; exit 1; }
echo "mock dashboard: http://127.0.0.1:$port (API: /api/hosts, /api/hosts/$host/messages)"

# A small config repository, so generation and the `test` command show something.
repo="$work/repo"
mkdir -p "$repo/hosts/$host/tests"
printf '#!/bin/sh\necho "hello from a host test"\n' > "$repo/hosts/$host/tests/T01-hello.sh"
chmod +x "$repo/hosts/$host/tests/T01-hello.sh"
git -C "$repo" init -q -b main
git -C "$repo" add .
git -C "$repo" -c user.name=demo -c user.email=demo@example.invalid commit -q -m "demo config"

# Off NixOS there is no nixos-rebuild: a labelled stand-in lets you try
# `switch` and watch its output stream. Asked for Nix's structured log (as
# the agent does for switch and boot), it replays a recorded one, paced, so
# the dashboard shows the rendered build log and live build progress.
mkdir -p "$work/bin"
if ! command -v nixos-rebuild >/dev/null; then
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
repo_dir = "$repo"
state_dir = "$work/state"
hostname = "$host"
interval = 2
TOML
PATH="$work/bin:$PATH" target/debug/nixfleet-agent --config "$work/agent.toml" 2> "$work/agent.log" &
pids+=($!)
echo "agent: pid ${pids[1]}, log $work/agent.log"
if command -v curl >/dev/null; then
  echo "try:   curl -s -XPOST 127.0.0.1:$port/api/hosts/$host/command -d '{\"command\": \"switch\"}'"
  echo "       curl -s '127.0.0.1:$port/api/hosts/$host/messages?type=output'"
fi
echo

python3 - "$port" "$host" "$check_only" <<'PY'
import json, sys, time, urllib.request
port, host, check_only = sys.argv[1], sys.argv[2], sys.argv[3] == "true"
base = f"http://127.0.0.1:{port}"
def get(path):
    with urllib.request.urlopen(base + path, timeout=5) as r:
        return json.load(r)
deadline = time.time() + 30
while True:
    try:
        hosts = {h["hostname"]: h for h in get("/api/hosts")}
        h = hosts.get(host)
        if h:
            beats = get(f"/api/hosts/{host}/messages?type=heartbeat")["messages"]
            last = h.get("last_heartbeat") or {}
            print(f"{time.strftime('%H:%M:%S')}  {host}: {'online' if h['online'] else 'offline'}, "
                  f"{len(beats)} heartbeats, generation {last.get('generation', '?')!r}, "
                  f"running {last.get('pending_command')!r}, metrics {last.get('metrics')}", flush=True)
            system = (h.get("progress") or {}).get("system")
            if system:
                builds = (system.get("detail") or {}).get("builds") or {}
                print(f"          build progress: {system.get('current')}/{system.get('total')} "
                      f"{system.get('status')}, builds {builds.get('done', 0)}/{builds.get('expected', 0)}",
                      flush=True)
            if check_only and h["online"] and len(beats) >= 2:
                print("demo check passed: the host is online with heartbeats")
                break
        else:
            print(f"{time.strftime('%H:%M:%S')}  waiting for {host} to register ...", flush=True)
    except OSError as e:
        print(f"dashboard not answering: {e}", flush=True)
    if check_only and time.time() > deadline:
        sys.exit("demo check failed: the host did not come online with heartbeats within 30 s")
    time.sleep(0.5 if check_only else 3)
PY
