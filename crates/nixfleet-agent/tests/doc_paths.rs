//! Every repository path named in backticks in README.md and docs/*.md
//! exists: the README once sent readers to `src/file_cache.rs` without its
//! crate's prefix (issue 26). A span counts as a repository path when its
//! first component is a top-level entry of the repository or a crate's
//! own directory name (`src/`, `tests/`, `examples/`, `benches/`), the
//! usual way such a prefix gets lost. Upstream's paths (its Go code is
//! under `src/internal/`, its tests under `src/tests/`) are not ours.
//! (docs/ is not part of the Nix package's source: `docs_`.)

use std::path::{Path, PathBuf};

/// Directories a build creates: named in the docs, absent from a checkout.
const BUILD_OUTPUTS: &[&str] = &["target", "fuzz/target"];

/// Path prefixes that name upstream's repository (markus-barta/nixfleet).
const UPSTREAM: &[&str] = &["src/internal/", "src/tests/"];

/// First components that make a span a path in this repository.
const CRATE_DIRS: &[&str] = &["src", "tests", "examples", "benches"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn pages(root: &Path) -> Vec<PathBuf> {
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("read docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The spans between backticks of one page.
fn code_spans(text: &str) -> impl Iterator<Item = &str> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| !s.contains('\n'))
}

/// The repository path a span names, if it names one: `path:12` and
/// `path#anchor` name `path`.
fn repository_path<'a>(span: &'a str, top_level: &[String]) -> Option<&'a str> {
    let looks_like_a_path = !span.is_empty()
        && span
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-:#".contains(c))
        && !span.starts_with(['/', '-', '.'])
        && !span.contains("://");
    if !looks_like_a_path {
        return None;
    }
    let path = span.split(['#', ':']).next()?;
    let first = path.split('/').next()?;
    let ours = if path.contains('/') {
        top_level.iter().any(|t| t == first) || CRATE_DIRS.contains(&first)
    } else {
        // A bare name counts only as a top-level file (`flake.nix`).
        path.contains('.') && top_level.iter().any(|t| t == first)
    };
    let excluded = UPSTREAM.iter().any(|u| path.starts_with(u))
        || BUILD_OUTPUTS
            .iter()
            .any(|b| path.trim_end_matches('/') == *b);
    (ours && !excluded).then_some(path)
}

#[test]
fn docs_every_repository_path_in_backticks_exists() {
    let root = root();
    let top_level: Vec<String> = std::fs::read_dir(&root)
        .expect("read the repository")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "target")
        .collect();
    let mut missing = Vec::new();
    for page in pages(&root) {
        let text = std::fs::read_to_string(&page).expect("read a page");
        for span in code_spans(&text) {
            if let Some(path) = repository_path(span, &top_level)
                && !root.join(path).exists()
            {
                let name = page.strip_prefix(&root).unwrap_or(&page).display();
                missing.push(format!("{name}: `{span}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "paths named in the docs that do not exist (write them from the \
         repository's root, e.g. crates/nixfleet-agent/src/…):\n{}",
        missing.join("\n")
    );
}

#[test]
fn docs_path_detection_catches_a_lost_crate_prefix() {
    let top = vec![
        "crates".to_owned(),
        "README.md".to_owned(),
        "docs".to_owned(),
    ];
    assert_eq!(
        repository_path("src/file_cache.rs", &top),
        Some("src/file_cache.rs")
    );
    assert_eq!(
        repository_path("crates/nixfleet-agent/src/agent.rs:12", &top),
        Some("crates/nixfleet-agent/src/agent.rs")
    );
    assert_eq!(repository_path("README.md#try-it", &top), Some("README.md"));
    assert_eq!(repository_path("src/internal/hub.go", &top), None);
    assert_eq!(repository_path("switch", &top), None);
    assert_eq!(repository_path("/etc/NIXOS", &top), None);
}
