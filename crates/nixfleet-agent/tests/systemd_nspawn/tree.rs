//! Prerequisites: the programs these tests need, the agent's unit rendered
//! from the NixOS module, and the cached Debian tree every container boots.

use super::util::{last_lines, run_bounded};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The token file the agent's unit is rendered with (inside the container).
pub const TOKEN_PATH: &str = "/etc/nixfleet/token";
/// `WatchdogSec=` of the agent's unit in these tests.
pub const WATCHDOG_SEC: u64 = 3;

pub struct Env {
    pub tree: PathBuf,
    /// The agent's unit as the NixOS module renders it, with `@agent@`,
    /// `@config@` and `@path@` for the store paths.
    pub agent_unit: String,
}

/// The shared environment, or `None` (after printing why) when this machine
/// cannot run the tests. Under `CI=true` that is a failure instead.
pub fn environment() -> Option<&'static Env> {
    static ENV: OnceLock<Result<Env, Unavailable>> = OnceLock::new();
    match ENV.get_or_init(prepare) {
        Ok(env) => Some(env),
        Err(Unavailable::Skip(why)) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true, so not skipping: {why}");
            }
            eprintln!("skipped: {why}");
            None
        }
        Err(Unavailable::Broken(why)) => panic!("{why}"),
    }
}

enum Unavailable {
    /// The machine cannot run nspawn at all.
    Skip(String),
    /// It should, but something failed.
    Broken(String),
}

fn prepare() -> Result<Env, Unavailable> {
    if find_program("systemd-nspawn").is_none() {
        return Err(Unavailable::Skip(
            "no systemd-nspawn (apt-get install systemd-container)".into(),
        ));
    }
    if !rustix::process::geteuid().is_root() {
        return Err(Unavailable::Skip("systemd-nspawn needs root".into()));
    }
    if find_program("nsenter").is_none() {
        return Err(Unavailable::Skip("no nsenter (util-linux)".into()));
    }
    let agent_unit = render_agent_unit()?;
    let cache = std::env::var_os("NIXFLEET_NSPAWN_CACHE").map_or_else(
        || PathBuf::from("/var/cache/nixfleet-nspawn"),
        PathBuf::from,
    );
    let tree = cache.join("bookworm");
    if !tree_is_complete(&tree) && find_program("debootstrap").is_none() {
        return Err(Unavailable::Skip(format!(
            "no debootstrap (apt-get install debootstrap) and no cached tree at {}",
            tree.display()
        )));
    }
    build_tree(&cache, &tree).map_err(Unavailable::Broken)?;
    Ok(Env { tree, agent_unit })
}

/// The agent's unit from `nix/render-unit.nix`, with this test's token file
/// and watchdog timeout.
fn render_agent_unit() -> Result<String, Unavailable> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let lib = std::env::var_os("NIXPKGS_LIB")
        .map_or_else(|| repo.join("../shared/nix/nixpkgs/lib"), PathBuf::from);
    let nixos_lib =
        std::env::var_os("NIXOS_LIB").map_or_else(|| lib.join("../nixos/lib"), PathBuf::from);
    let Some(nix_instantiate) = find_program("nix-instantiate") else {
        return Err(Unavailable::Skip(
            "no nix-instantiate (apt-get install nix-bin) to render the unit from the NixOS module"
                .into(),
        ));
    };
    let (Ok(lib), Ok(nixos_lib)) = (lib.canonicalize(), nixos_lib.canonicalize()) else {
        return Err(Unavailable::Skip(format!(
            "no nixpkgs lib at {} with nixos/lib at {} to render the unit from the NixOS module \
             (set NIXPKGS_LIB and NIXOS_LIB)",
            lib.display(),
            nixos_lib.display()
        )));
    };
    let mut command = Command::new(nix_instantiate);
    command
        .args(["--readonly-mode", "--eval", "--strict", "--json"])
        .arg(repo.join("nix/render-unit.nix"))
        .args(["--arg", "lib", &format!("import {}", lib.display())])
        .args(["--arg", "nixosLib", &nixos_lib.display().to_string()])
        .args(["--argstr", "tokenFile", TOKEN_PATH])
        .args(["--arg", "watchdogSec", &WATCHDOG_SEC.to_string()]);
    let output = run_bounded(command, Duration::from_secs(120))
        .map_err(|e| Unavailable::Broken(format!("nix-instantiate nix/render-unit.nix: {e}")))?;
    if !output.status.success() {
        return Err(Unavailable::Broken(format!(
            "nix-instantiate nix/render-unit.nix failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|e| Unavailable::Broken(format!("nix/render-unit.nix: not a JSON string: {e}")))
}

const TREE_MARKER: &str = ".nixfleet-nspawn-tree";

fn tree_is_complete(tree: &Path) -> bool {
    tree.join(TREE_MARKER).is_file()
}

/// Builds the bookworm tree unless it exists: under a lock (parallel test
/// processes wait for one build), in a temporary directory renamed into
/// place only when complete.
fn build_tree(cache: &Path, tree: &Path) -> Result<(), String> {
    if tree_is_complete(tree) {
        return Ok(());
    }
    fs::create_dir_all(cache).map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let lock_path = cache.join(".lock");
    let lock = fs::File::create(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
    if tree_is_complete(tree) {
        return Ok(()); // another process built it meanwhile
    }
    // Leftovers of interrupted builds (nobody else builds: we hold the lock).
    if let Ok(entries) = fs::read_dir(cache) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with("bookworm.tmp-") {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let _ = fs::remove_dir_all(tree); // incomplete: no marker
    debootstrap(cache, tree)
}

/// Runs debootstrap into a temporary directory of `cache` and renames it to
/// `tree` once complete (the caller holds the cache's lock).
fn debootstrap(cache: &Path, tree: &Path) -> Result<(), String> {
    let mirror = debian_mirror();
    let building = cache.join(format!("bookworm.tmp-{}", std::process::id()));
    let log_path = cache.join("debootstrap.log");
    let log = fs::File::create(&log_path).map_err(|e| e.to_string())?;
    eprintln!(
        "building the bookworm tree for systemd-nspawn tests (once per machine, ~1 min) from {mirror} in {}",
        tree.display()
    );
    let started = Instant::now();
    let status = Command::new(find_program("debootstrap").expect("checked"))
        .args([
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus,iproute2",
            "bookworm",
        ])
        .arg(&building)
        .arg(&mirror)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .status()
        .map_err(|e| format!("cannot run debootstrap: {e}"))?;
    if !status.success() {
        let _ = fs::remove_dir_all(&building);
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        return Err(format!(
            "debootstrap failed ({status}); the end of {}:\n{}",
            log_path.display(),
            last_lines(&log, 15)
        ));
    }
    fs::write(
        building.join(TREE_MARKER),
        format!("debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2 bookworm {mirror}\n"),
    )
    .map_err(|e| e.to_string())?;
    fs::rename(&building, tree).map_err(|e| format!("cannot rename the tree into place: {e}"))?;
    eprintln!("built {} in {:?}", tree.display(), started.elapsed());
    Ok(())
}

/// The host's Debian mirror (the first apt source for bookworm), or
/// `$NIXFLEET_DEBIAN_MIRROR`, or deb.debian.org.
fn debian_mirror() -> String {
    if let Ok(mirror) = std::env::var("NIXFLEET_DEBIAN_MIRROR") {
        return mirror;
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let name = file.to_string_lossy();
        let found = if name.ends_with(".sources") {
            mirror_from_deb822(&text)
        } else if name.ends_with(".list") {
            mirror_from_one_line(&text)
        } else {
            None
        };
        if let Some(mirror) = found {
            return mirror;
        }
    }
    "http://deb.debian.org/debian".to_owned()
}

/// `deb [options] URI bookworm components…`
pub fn mirror_from_one_line(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let mut words = line.split_whitespace();
        if words.next()? != "deb" {
            return None;
        }
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            // options, possibly spread over several words
            while !uri.ends_with(']') {
                uri = words.next()?;
            }
            uri = words.next()?;
        }
        let suite = words.next()?;
        (suite == "bookworm" && uri.starts_with("http")).then(|| uri.to_owned())
    })
}

/// Stanzas of `Types: deb`, `URIs: …`, `Suites: bookworm …`.
pub fn mirror_from_deb822(text: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim().eq_ignore_ascii_case(name)).then(|| value.trim().to_owned())
            })
        };
        let enabled = field("Enabled").is_none_or(|v| v != "no");
        let types = field("Types")?;
        let suites = field("Suites")?;
        let uri = field("URIs")?.split_whitespace().next()?.to_owned();
        (enabled
            && types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == "bookworm")
            && uri.starts_with("http"))
        .then_some(uri)
    })
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
