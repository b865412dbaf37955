#!/usr/bin/env bash
# A fleet on one machine: N real agents (hostnames fleet-1..N, each with its
# own state and repository directory, heartbeat every 30 s unless
# NIXFLEET_FLEET_INTERVAL says otherwise) against the mock dashboard on
# loopback. Prints what a fleet does that one agent never shows:
#
#   - the time until all N registered; the agents' RSS, total and per agent;
#     the mock's RSS, total and per host;
#   - the mock killed (SIGKILL, like a crash, or SIGTERM with
#     NIXFLEET_FLEET_SIGNAL=TERM: the graceful 1001 close), down 10 s
#     (NIXFLEET_FLEET_DOWN), restarted on the same port: registrations per
#     250 ms after the restart, the busiest 1 s window as a share of the
#     fleet, the time until all are back;
#   - a `test` sent to all N with one `POST /api/command`: the time until
#     all N statuses arrived.
#
# Usage: scripts/fleet.sh N     (N from 1 to 5000; 50 is the CI size)
#
# It measures and prints; it never fails on timing. It fails only when it
# cannot run (bad N, no build, a process that does not start) or when the
# fleet does not come back at all within generous deadlines (the agents'
# backoff_max, 300 s, plus a margin). Timestamps come from the mock's own
# records (`registered_at`, the status messages' `t`), not from polling.
set -euo pipefail
cd "$(dirname "$0")/.."

n="${1:-}"
case "$n" in
  '' | *[!0-9]*) echo "usage: scripts/fleet.sh N   (N agents, 1 to 5000)" >&2; exit 2 ;;
esac
if [ "$n" -lt 1 ] || [ "$n" -gt 5000 ]; then
  echo "usage: scripts/fleet.sh N   (N agents, 1 to 5000)" >&2
  exit 2
fi
command -v python3 >/dev/null || { echo "fleet.sh needs python3 (apt-get install python3)" >&2; exit 1; }
command -v git >/dev/null || { echo "fleet.sh needs git (apt-get install git)" >&2; exit 1; }

# Each agent holds a few descriptors; the mock one per agent, plus some.
ulimit -n "$(( n * 4 + 1024 ))" 2>/dev/null || true
# Each agent also holds one inotify instance, and those are limited per user.
# Past the limit an agent runs without one (it checks its files' metadata on
# each heartbeat instead: src/file_watch.rs), which the fleet survives; but
# meanwhile no other program of this user gets an instance either.
inotify_limit="$(cat /proc/sys/fs/inotify/max_user_instances 2>/dev/null || true)"
if [ -n "$inotify_limit" ] && [ "$n" -gt "$inotify_limit" ]; then
  echo "note: $n agents exceed fs.inotify.max_user_instances ($inotify_limit): the agents past it poll their files on each heartbeat instead of watching them, and other programs of this user get no inotify instance while the fleet runs; for a one-machine test, raise it first: sysctl fs.inotify.max_user_instances=$(( n + 256 )) (real hosts run one agent each)"
fi

cargo build --quiet -p nixfleet-agent -p nixfleet-mock-dashboard --bins
bin=target/debug
work="$(mktemp -d -t nixfleet-fleet.XXXXXX)"
echo "fleet of $n agents; binaries in $bin; work directory $work (removed at the end)"

exec python3 - "$n" "$bin" "$work" <<'PY'
import json, os, shutil, signal, subprocess, sys, time, urllib.request

n, bin_dir, work = int(sys.argv[1]), sys.argv[2], sys.argv[3]
interval = int(os.environ.get("NIXFLEET_FLEET_INTERVAL", "30"))
down = float(os.environ.get("NIXFLEET_FLEET_DOWN", "10"))
kill_signal = signal.SIGTERM if os.environ.get("NIXFLEET_FLEET_SIGNAL") == "TERM" else signal.SIGKILL
names = [f"fleet-{i}" for i in range(1, n + 1)]
agents, mock = [], None
# Beyond these the fleet did not come back at all: a failure, not a timing.
REGISTER_DEADLINE = 120 + n * 0.2
BACK_DEADLINE = 300 + 60 + n * 0.2
now_ms = lambda: time.time() * 1000

def git(*args, cwd=None):
    subprocess.run(["git", "-c", "user.name=fleet", "-c", "user.email=fleet@example.invalid",
                    "-c", "init.defaultBranch=main", *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

def start_mock(port):
    log = open(os.path.join(work, "dashboard.log"), "ab")
    proc = subprocess.Popen([os.path.join(bin_dir, "nixfleet-mock-dashboard"), "--listen",
                             f"127.0.0.1:{port}", "--token-file", os.path.join(work, "token"),
                             "--log-level", "warn"],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        sys.exit(f"the mock dashboard did not start: {line!r}; see {work}/dashboard.log")
    return proc, line.split()[-1]

def api(addr, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(f"http://{addr}{path}", data=data), timeout=30) as r:
        return json.load(r)

def wait(what, deadline, probe):
    """Polls `probe` (an HTTP read of the mock) until it returns a value."""
    start = time.monotonic()
    while True:
        got = probe()
        if got is not None:
            return got
        if time.monotonic() - start > deadline:
            sys.exit(f"FAILED: {what} not within {deadline:.0f} s")
        time.sleep(0.1)

def registered_since(addr, since):
    """Every host's registered_at (ms) once all N registered after `since`."""
    hosts = api(addr, "/api/hosts")
    times = [h["registered_at"] for h in hosts if h["connected"] and (h["registered_at"] or 0) >= since]
    return times if len(times) == n else None

def setup():
    with open(os.path.join(work, "token"), "w") as f:
        f.write(os.urandom(16).hex())
    os.chmod(os.path.join(work, "token"), 0o600)
    seed = os.path.join(work, "seed")
    for name in names:
        tests = os.path.join(seed, "hosts", name, "tests")
        os.makedirs(tests)
        with open(os.path.join(tests, "T01-hello.sh"), "w") as f:
            f.write("#!/bin/sh\necho hello from a fleet test\n")
        os.chmod(os.path.join(tests, "T01-hello.sh"), 0o755)
    git("init", "-q", "-b", "main", cwd=seed)
    git("add", ".", cwd=seed)
    git("commit", "-q", "-m", "fleet", cwd=seed)

def start_agent(name, addr):
    home = os.path.join(work, name)
    git("clone", "-q", os.path.join(work, "seed"), os.path.join(home, "repo"))
    config = os.path.join(home, "agent.toml")
    with open(config, "w") as f:
        f.write(f'url = "ws://{addr}/ws"\ntoken_file = "{work}/token"\nrepo_dir = "{home}/repo"\n'
                f'state_dir = "{home}/state"\nhostname = "{name}"\ninterval = {interval}\n')
    log = open(os.path.join(home, "agent.log"), "ab")
    return subprocess.Popen([os.path.join(bin_dir, "nixfleet-agent"), "--config", config],
                            stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)

def spread(times, t0):
    """Registrations per 250 ms after t0, and the busiest 1 s window."""
    rel = sorted(t - t0 for t in times)
    buckets = {}
    for r in rel:
        buckets[int(r // 250)] = buckets.get(int(r // 250), 0) + 1
    j, busiest = 0, 0
    for i, r in enumerate(rel):
        while rel[j] < r - 999:
            j += 1
        busiest = max(busiest, i - j + 1)
    return rel, buckets, busiest

def report_spread(rel, buckets, busiest):
    print("  registrations per 250 ms after the restart (ms from: count):")
    row = [f"{k * 250:>6}: {buckets[k]:<4}" for k in sorted(buckets)]
    for i in range(0, len(row), 6):
        print("   " + "  ".join(row[i:i + 6]))
    print(f"  busiest 1 s window: {busiest} of {n} ({100 * busiest / n:.0f} % of the fleet)")
    print(f"  first back after {rel[0] / 1000:.2f} s, median {rel[len(rel) // 2] / 1000:.2f} s, "
          f"all {n} back after {rel[-1] / 1000:.2f} s")

def run():
    global mock
    setup()
    mock, addr = start_mock(0)
    port = addr.rsplit(":", 1)[1]
    t0 = now_ms()
    for name in names:
        agents.append(start_agent(name, addr))
    started = now_ms()
    times = wait("all registered", REGISTER_DEADLINE, lambda: registered_since(addr, t0))
    print(f"started {n} agents in {(started - t0) / 1000:.2f} s (with their git clones); "
          f"all registered {(max(times) - t0) / 1000:.2f} s after the first start")
    time.sleep(2)  # let start-up memory be released (after the first connection)
    rss = [rss_kib(a.pid) for a in agents]
    print(f"agents' RSS: {sum(rss) / 1024:.1f} MiB in total, {sum(rss) / len(rss) / 1024:.2f} MiB per agent "
          f"(min {min(rss) / 1024:.2f}, max {max(rss) / 1024:.2f})")
    m = rss_kib(mock.pid)
    print(f"mock's RSS: {m / 1024:.1f} MiB, {m / n:.0f} KiB per host")

    print(f"dashboard restart: SIG{kill_signal.name[3:]}, down {down:.0f} s, restarted on port {port}")
    mock.send_signal(kill_signal)
    mock.wait()
    time.sleep(down)
    mock, addr = start_mock(port)
    restart = now_ms()
    times = wait("all back after the restart", BACK_DEADLINE, lambda: registered_since(addr, restart))
    report_spread(*spread(times, restart))

    sent_at = now_ms()
    reply = api(addr, "/api/command", {"command": "test", "hosts": "all"})
    if reply["failed"]:
        print(f"  (not sent to {len(reply['failed'])} hosts: {reply['failed'][0]['error']})")
    def statuses():
        done = [h for h in api(addr, "/api/hosts")
                if h["command"] and h["command"]["command"] == "test" and h["command"]["status"]]
        return done if len(done) == len(reply["sent"]) else None
    wait("all test statuses", 120 + n * 0.5, statuses)
    last = max(api(addr, f"/api/hosts/{name}/messages?type=status")["messages"][-1]["t"]
               for name in names)
    counts = {}
    for h in api(addr, "/api/hosts"):
        status = h["command"]["status"]
        key = status["status"] if status["status"] == "ok" else f"{status['status']} ({status.get('message')})"
        counts[key] = counts.get(key, 0) + 1
    print(f"a test sent to all {n}: all {len(reply['sent'])} statuses {(last - sent_at) / 1000:.2f} s "
          f"after the request; " + ", ".join(f"{c} {k}" for k, c in sorted(counts.items())))

def cleanup():
    for p in agents + ([mock] if mock else []):
        if p.poll() is None:
            p.terminate()
    for p in agents + ([mock] if mock else []):
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()

try:
    run()
    cleanup()
    shutil.rmtree(work, ignore_errors=True)
except BaseException:
    cleanup()
    print(f"logs kept in {work}", file=sys.stderr)
    raise
PY
