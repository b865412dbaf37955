//! docs/config.md against the code: every key in `config::KEYS` has a row
//! in the "Keys" table with its environment variable, its flag (or "—")
//! and its built-in default, and the table names nothing the code lacks;
//! every environment variable the loader reads and every flag of the CLI
//! is documented somewhere on the page.
//!
//! The failure messages say which row to add or fix, so whoever adds a key
//! learns from the test what to write. (docs/ is not part of the Nix
//! package's source, so the package build skips these tests: `docs_`.)

use clap::CommandFactory;
use nixfleet_agent::config::{Cli, KEYS, env_var_names, load_with};
use std::collections::BTreeMap;
use std::path::PathBuf;

const PAGE: &str = "docs/config.md";

fn page() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(PAGE);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {PAGE}: {e}"))
}

/// One row of the "## Keys" table.
#[derive(Debug)]
struct Row {
    env: String,
    flag: String,
    default: String,
}

/// The rows of the table under `## Keys`, by key. Panics on a malformed row
/// (wrong number of cells, key not in backticks), naming it.
fn key_rows(page: &str) -> BTreeMap<String, Row> {
    let section = page
        .split("\n## ")
        .find(|s| s.starts_with("Keys\n"))
        .unwrap_or_else(|| panic!("{PAGE} has no \"## Keys\" section"));
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        assert_eq!(
            cells.len(),
            5,
            "{PAGE}: a row of the Keys table needs 5 cells (key | environment | flag | \
             default | meaning): {line}"
        );
        let key =
            unquote(cells[0]).unwrap_or_else(|| panic!("{PAGE}: key not in backticks: {line}"));
        let row = Row {
            env: cells[1].to_owned(),
            flag: cells[2].to_owned(),
            default: cells[3].to_owned(),
        };
        assert!(
            rows.insert(key.clone(), row).is_none(),
            "{PAGE}: `{key}` has two rows"
        );
    }
    rows
}

/// `` `x` `` → `x`, when the cell is exactly one code span.
fn unquote(cell: &str) -> Option<String> {
    let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
    (!inner.contains('`')).then(|| inner.to_owned())
}

/// Long flag of each CLI argument, by the key (field) it sets.
fn cli_flags() -> BTreeMap<String, String> {
    Cli::command()
        .get_arguments()
        .filter_map(|a| Some((a.get_id().to_string(), format!("--{}", a.get_long()?))))
        .collect()
}

fn suggested_row(key: &str) -> String {
    let flag = cli_flags()
        .get(key)
        .cloned()
        .unwrap_or_else(|| "—".to_owned());
    format!(
        "| `{key}` | `NIXFLEET_{}` | {} | <default> | <meaning> |",
        key.to_ascii_uppercase(),
        if flag == "—" {
            flag
        } else {
            format!("`{flag}`")
        }
    )
}

#[test]
fn docs_every_key_has_a_row_and_every_row_a_key() {
    let rows = key_rows(&page());
    for key in KEYS {
        assert!(
            rows.contains_key(*key),
            "config key `{key}` (config::KEYS) is not documented: add a row to the \"Keys\" \
             table of {PAGE}, like\n  {}",
            suggested_row(key)
        );
    }
    for key in rows.keys() {
        assert!(
            KEYS.contains(&key.as_str()),
            "{PAGE} documents key `{key}`, which is not in config::KEYS: remove its row from \
             the \"Keys\" table (or add the key to crates/nixfleet-agent/src/config/keys.rs)"
        );
    }
}

#[test]
fn docs_rows_name_the_right_environment_variable_and_flag() {
    let rows = key_rows(&page());
    let flags = cli_flags();
    for (key, row) in &rows {
        let env = format!("`NIXFLEET_{}`", key.to_ascii_uppercase());
        assert_eq!(
            row.env, env,
            "{PAGE}, row `{key}`: the environment column must be {env}"
        );
        let flag = match flags.get(key) {
            Some(flag) => format!("`{flag}`"),
            None => "—".to_owned(),
        };
        assert_eq!(
            row.flag, flag,
            "{PAGE}, row `{key}`: the flag column must be {flag} (the flags are the fields \
             of config::Cli)"
        );
    }
}

#[test]
fn docs_every_environment_variable_and_flag_is_documented() {
    let page = page();
    for name in env_var_names() {
        assert!(
            page.contains(&format!("`{name}`")),
            "the loader reads environment variable {name}, which {PAGE} does not mention: \
             add it to the \"Keys\" table (NIXFLEET_<KEY>) or the \"Other environment \
             variables and flags\" table"
        );
    }
    let known = env_var_names();
    let mentioned = page.split('`').filter(|w| {
        w.starts_with("NIXFLEET_") && w.chars().all(|c| c.is_ascii_uppercase() || c == '_')
    });
    for name in mentioned {
        assert!(
            known.iter().any(|k| k == name),
            "{PAGE} mentions environment variable {name}, which the loader does not read \
             (config::env_var_names): remove it or fix its spelling"
        );
    }
    for (id, flag) in cli_flags() {
        assert!(
            page.contains(&format!("`{flag}")),
            "flag {flag} (config::Cli::{id}) is not documented in {PAGE}: add it to the \
             \"Keys\" table's flag column or the \"Other environment variables and flags\" table"
        );
    }
}

#[test]
fn docs_defaults_match_the_built_in_ones() {
    let rows = key_rows(&page());
    let env: BTreeMap<&str, &str> = [
        ("NIXFLEET_URL", "ws://127.0.0.1:9/ws"),
        ("NIXFLEET_TOKEN", "docs-test-token"),
        ("NIXFLEET_REPO_DIR", "/srv/fleet"),
        ("NIXFLEET_HOSTNAME", "docs-host"),
    ]
    .into();
    let config = load_with(&Cli::default(), |name| env.get(name).map(|v| v.to_string()))
        .unwrap_or_else(|e| panic!("a minimal configuration does not load: {e}"));
    let rendered = config.render();
    let mut checked = 0;
    for line in rendered.lines() {
        let Some((setting, origin)) = line.split_once("  # from ") else {
            continue;
        };
        if origin != "built-in default" {
            continue;
        }
        let (key, value) = setting
            .split_once(" = ")
            .expect("render writes key = value");
        let value = value.trim_matches('"');
        let row = rows
            .get(key)
            .unwrap_or_else(|| panic!("key `{key}` has no row in {PAGE}'s Keys table"));
        assert!(
            row.default.contains(&format!("`{value}`")),
            "{PAGE}, row `{key}`: the built-in default is `{value}`, the default column says \
             {:?}",
            row.default
        );
        checked += 1;
    }
    assert!(
        checked >= 8,
        "only {checked} defaults found in:\n{rendered}"
    );
}
