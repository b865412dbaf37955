//! The agent's setup inside a container: its token, config and unit (as the
//! module renders it), the stand-in `nixos-rebuild`, the mock dashboard's
//! unit, and what the tests ask the mock about the host.

use super::container::{BIN_DIR, CONTAINER_PATH, Container};
use super::tree::{TOKEN_PATH, environment};
use super::util::{WAIT, contains, expect, fill, free_port, http, unique_token, wait_until};
use serde_json::Value;

const AGENT_DROP_IN: &str = include_str!("../systemd/nixfleet-test.conf");
const MOCK_UNIT_TEMPLATE: &str = include_str!("../systemd/mock-dashboard.service");
const STAND_IN_REBUILD: &str = include_str!("../systemd/nixos-rebuild");

/// Inside the container.
pub const CONFIG_PATH: &str = "/etc/nixfleet/agent.toml";
const REPO_DIR: &str = "/srv/nixfleet-repo";
pub const STAND_IN_BIN: &str = "/opt/nixfleet-test/bin";

pub struct AgentSetup {
    pub port: u16,
    pub hostname: String,
    pub token: String,
}

impl AgentSetup {
    /// Writes the token, the agent's config, its unit (as the module renders
    /// it, the stand-in nixos-rebuild first on its PATH) with the test
    /// drop-in, the stand-in nixos-rebuild and the mock dashboard's unit;
    /// starts nothing.
    pub fn install(c: &Container, hostname: &str) -> AgentSetup {
        let setup = AgentSetup {
            port: free_port(),
            hostname: hostname.to_owned(),
            token: unique_token(),
        };
        c.write(TOKEN_PATH, setup.token.as_bytes(), 0o600);
        let config = format!(
            "url = \"{url}\"\nrepo_dir = \"{REPO_DIR}\"\nhostname = \"{hostname}\"\n\
             interval = 1\nping_interval = 1\nping_timeout = 3\nbackoff_max = 2\n\
             metrics = \"proc\"\nlog_level = \"info\"\n",
            url = setup.url()
        );
        c.write(CONFIG_PATH, config.as_bytes(), 0o644);
        c.mkdir(REPO_DIR);
        c.write(
            &format!("{STAND_IN_BIN}/nixos-rebuild"),
            STAND_IN_REBUILD.as_bytes(),
            0o755,
        );
        setup.write_units(c);
        c.ok(&["systemctl", "daemon-reload"]);
        setup
    }

    /// The agent's unit (as the module renders it, the stand-in
    /// nixos-rebuild first on its PATH) with the test drop-in, and the mock
    /// dashboard's unit.
    fn write_units(&self, c: &Container) {
        let unit = fill(
            &environment().expect("checked by the test").agent_unit,
            &[
                ("@agent@", &format!("{BIN_DIR}/nixfleet-agent")),
                ("@config@", CONFIG_PATH),
                ("@path@", &format!("{STAND_IN_BIN}:{CONTAINER_PATH}")),
            ],
        );
        assert!(
            !unit.contains("/nix/store/"),
            "a store path is left in the unit:\n{unit}"
        );
        c.write(
            "/etc/systemd/system/nixfleet.service",
            unit.as_bytes(),
            0o644,
        );
        c.write(
            "/etc/systemd/system/nixfleet.service.d/test.conf",
            AGENT_DROP_IN.as_bytes(),
            0o644,
        );
        let mock = fill(
            MOCK_UNIT_TEMPLATE,
            &[
                ("@mock@", &format!("{BIN_DIR}/nixfleet-mock-dashboard")),
                ("@listen@", &format!("127.0.0.1:{}", self.port)),
                ("@token_file@", TOKEN_PATH),
            ],
        );
        c.write(
            "/etc/systemd/system/nixfleet-mock-dashboard.service",
            mock.as_bytes(),
            0o644,
        );
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    pub fn host_path(&self, rest: &str) -> String {
        format!("/api/hosts/{}{rest}", self.hostname)
    }

    /// Starts the mock dashboard and the agent, and waits until the agent
    /// registered and heartbeats.
    pub fn start(&self, c: &Container) {
        c.ok(&["systemctl", "start", "nixfleet-mock-dashboard.service"]);
        c.ok(&["systemctl", "start", "nixfleet.service"]);
        c.check(wait_for_heartbeats(self, 2), "registered, heartbeats");
    }

    /// `command` to the host from the dashboard's API.
    pub fn command(&self, c: &Container, command: &str) {
        c.check(
            http(
                self.port,
                "POST",
                &self.host_path("/command"),
                Some(&format!(r#"{{"command":"{command}"}}"#)),
            ),
            &format!("POST command {command}"),
        );
    }

    /// The index the next `kind` message at the dashboard will have.
    pub fn next_index(&self, kind: &str) -> u64 {
        self.messages(kind, u64::MAX)["next"].as_u64().unwrap_or(0)
    }

    /// How many `kind` messages the dashboard holds from `since` on.
    pub fn count(&self, kind: &str, since: u64) -> usize {
        self.messages(kind, since)["messages"]
            .as_array()
            .map_or(0, Vec::len)
    }

    /// The token appears nowhere in the container's journal.
    pub fn check_token_not_in_journal(&self, c: &Container) {
        let export = c.journal_export();
        c.check(
            expect(
                !contains(&export, self.token.as_bytes()),
                "the token appears nowhere in the journal (journalctl -o export)",
            ),
            "journal",
        );
    }

    /// The mock's JSON answer (`Null` when it is not reachable).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Value {
        http(self.port, method, path, body).unwrap_or(Value::Null)
    }

    pub fn messages(&self, kind: &str, since: u64) -> Value {
        self.api(
            "GET",
            &self.host_path(&format!("/messages?type={kind}&since={since}")),
            None,
        )
    }
}

pub fn wait_for_status(c: &Container, prefix: &str) -> Result<String, String> {
    let mut last = String::new();
    wait_until(
        &format!("StatusText starting with {prefix:?}"),
        WAIT,
        || {
            last = c.prop("nixfleet.service", "StatusText");
            last.starts_with(prefix).then(|| last.clone())
        },
    )
    .map_err(|e| format!("{e}; last StatusText: {last:?}"))
}

/// Waits until the dashboard holds `count` heartbeats of the host's live,
/// registered connection and says it is online.
pub fn wait_for_heartbeats(setup: &AgentSetup, count: usize) -> Result<(), String> {
    wait_until(&format!("{count} heartbeats"), WAIT, || {
        let host = setup.api("GET", &setup.host_path(""), None);
        let live = host["live_connection"].as_u64()?;
        if host["online"] != true || host["last_heartbeat"].is_null() {
            return None;
        }
        let messages = setup.messages("heartbeat", 0);
        let on_live = messages["messages"]
            .as_array()?
            .iter()
            .filter(|m| m["conn"].as_u64() == Some(live))
            .count();
        (on_live >= count).then_some(())
    })
}
