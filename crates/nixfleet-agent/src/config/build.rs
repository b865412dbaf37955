//! Building the [`Config`]: the layers merged in order of precedence, the
//! merged values extracted into `Raw`, then validated key by key.

use super::cli::Cli;
use super::effective::{Config, TokenSource};
use super::errors::figment_error;
use super::keys::{Env, KEYS, MAX_CONFIRM_TIMEOUT_SECS, MAX_PERIOD_SECS, MAX_STOP_GRACE_SECS};
use super::layer::{Layer, LayerKind, describe};
use super::sources::credentials::{CredentialToken, credentials_layer};
use super::sources::defaults::{default_layer, system_layer};
use super::sources::env::env_layer;
use super::sources::flags::flag_layer;
use super::sources::toml_file::config_file_layer;
use super::validate::{
    DEVICE_TYPES, LOCATIONS, TokenSetting, Validator, check_token_not_in_url, resolve_token,
};
use figment::value::Value;
use figment::{Figment, Provider};
use secrecy::SecretString;
use std::collections::BTreeMap;
use std::time::Duration;

/// Everything figment extracts; validated into [`Config`] afterwards.
/// Strings and loosely typed values here, so that the validation (not
/// serde) words the errors.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    url: Option<String>,
    token: Option<SecretString>,
    token_file: Option<String>,
    repo_dir: Option<String>,
    repo_url: Option<String>,
    branch: Option<String>,
    interval: Option<Value>,
    ssh_key: Option<String>,
    hostname: Option<String>,
    log_level: Option<String>,
    metrics: Option<String>,
    stasysmo_dir: Option<String>,
    ping_interval: Option<Value>,
    ping_timeout: Option<Value>,
    backoff_max: Option<Value>,
    stop_grace: Option<Value>,
    state_dir: Option<String>,
    ca_file: Option<String>,
    tls_client_cert: Option<String>,
    tls_client_key: Option<String>,
    log_max_bytes: Option<Value>,
    logs_max_bytes: Option<Value>,
    allow_insecure_url: Option<Value>,
    theme_color: Option<String>,
    location: Option<String>,
    device_type: Option<String>,
    allow_reboot: Option<Value>,
    source_commit: Option<String>,
    allowed_signers_file: Option<String>,
    gpg_keyring: Option<String>,
    report_agent_version: Option<String>,
    metrics_textfile: Option<String>,
    confirm_timeout: Option<Value>,
    rollback_on_failed_tests: Option<Value>,
}

pub(super) fn build(
    cli: &Cli,
    env: Env<'_>,
    system_hostname: Option<String>,
    secrets: &mut Vec<SecretString>,
) -> Result<Config, String> {
    let mut warnings = Vec::new();
    let (figment, credential) = merge_layers(cli, env, system_hostname, secrets, &mut warnings)?;
    let raw: Raw = figment.extract().map_err(|e| figment_error(e, &figment))?;
    if let Some(token) = &raw.token {
        secrets.push(token.clone());
    }
    let v = Validator::new(&figment, warnings);
    let problems = independent_problems(&raw, &v);
    validate(raw, v, credential, secrets).map_err(|first| every_problem(first, problems))
}

/// The first problem, then every other bad value among the keys checked
/// on their own, on one line: a file with two mistakes needs one run to
/// see both, not two.
fn every_problem(first: String, problems: Vec<String>) -> String {
    let mut all = vec![first];
    for problem in problems {
        if !all.contains(&problem) {
            all.push(problem);
        }
    }
    all.join("; ")
}

/// `state_dir` alone, validated, with its origin.
pub(super) fn state_dir_only(
    cli: &Cli,
    env: Env<'_>,
    secrets: &mut Vec<SecretString>,
) -> Result<(std::path::PathBuf, String), String> {
    #[derive(serde::Deserialize)]
    struct StateDirOnly {
        state_dir: Option<String>,
    }
    let mut warnings = Vec::new();
    let (figment, _) = merge_layers(cli, env, None, secrets, &mut warnings)?;
    let only: StateDirOnly = figment.extract().map_err(|e| figment_error(e, &figment))?;
    let v = Validator::new(&figment, warnings);
    let dir = v.dir("state_dir", only.state_dir)?;
    Ok((dir, v.origin("state_dir")))
}

/// What is wrong with the keys whose check depends on no other key (the
/// same checks `validate` runs, on copies of the values).
fn independent_problems(raw: &Raw, v: &Validator<'_>) -> Vec<String> {
    let secs = |key: &str, value: &Option<Value>, min: u64, max: u64| {
        v.duration(key, value.clone(), min, max).err()
    };
    [
        v.repo_dir(raw.repo_dir.clone()).err(),
        v.repo_url(raw.repo_url.clone()).err(),
        v.branch(raw.branch.clone()).err(),
        v.hostname(raw.hostname.clone()).err(),
        v.log_level(raw.log_level.clone()).err(),
        v.metrics(raw.metrics.clone()).err(),
        v.dir("stasysmo_dir", raw.stasysmo_dir.clone()).err(),
        v.dir("state_dir", raw.state_dir.clone()).err(),
        v.ca_file(raw.ca_file.clone()).err(),
        secs("interval", &raw.interval, 1, MAX_PERIOD_SECS),
        secs("ping_interval", &raw.ping_interval, 1, MAX_PERIOD_SECS),
        secs("ping_timeout", &raw.ping_timeout, 1, MAX_PERIOD_SECS),
        secs("backoff_max", &raw.backoff_max, 1, MAX_PERIOD_SECS),
        secs("stop_grace", &raw.stop_grace, 0, MAX_STOP_GRACE_SECS),
        v.byte_size("log_max_bytes", raw.log_max_bytes.clone())
            .err(),
        v.byte_size("logs_max_bytes", raw.logs_max_bytes.clone())
            .err(),
        v.theme_color(raw.theme_color.clone()).err(),
        v.one_of("location", raw.location.clone(), LOCATIONS).err(),
        v.one_of("device_type", raw.device_type.clone(), DEVICE_TYPES)
            .err(),
        v.allow_reboot(raw.allow_reboot.clone()).err(),
        v.source_commit(raw.source_commit.clone()).err(),
        v.report_agent_version(raw.report_agent_version.clone())
            .err(),
        v.metrics_textfile(raw.metrics_textfile.clone()).err(),
        secs(
            "confirm_timeout",
            &raw.confirm_timeout,
            0,
            MAX_CONFIRM_TIMEOUT_SECS,
        ),
        v.boolean(
            "rollback_on_failed_tests",
            raw.rollback_on_failed_tests.clone(),
        )
        .err(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// All layers, lowest precedence first: built-in defaults, system
/// defaults, the TOML file, the environment, systemd credentials, flags.
fn merge_layers(
    cli: &Cli,
    env: Env<'_>,
    system_hostname: Option<String>,
    secrets: &mut Vec<SecretString>,
    warnings: &mut Vec<String>,
) -> Result<(Figment, Option<CredentialToken>), String> {
    let file = config_file_layer(cli, env)?;
    let (creds, credential) = credentials_layer(env, secrets, warnings)?;
    let flags = flag_layer(cli)?;
    let mut figment = Figment::new()
        .merge(default_layer())
        .merge(system_layer(system_hostname, env));
    for layer in [file, Some(env_layer(env)), Some(creds), Some(flags)]
        .into_iter()
        .flatten()
    {
        refuse_token_and_token_file(&layer)?;
        figment = figment.merge(layer);
    }
    Ok((figment, credential))
}

/// `token` and `token_file` in one layer is ambiguous. (Across layers the
/// later one wins, see `resolve_token`.)
fn refuse_token_and_token_file(layer: &Layer) -> Result<(), String> {
    if !(layer.dict.contains_key("token") && layer.dict.contains_key("token_file")) {
        return Ok(());
    }
    let meta = layer.metadata();
    let both = match layer.kind {
        LayerKind::File => format!("both are set in {}", describe(Some(&meta), "token")),
        _ => format!(
            "both are set: {} and {}",
            describe(Some(&meta), "token"),
            describe(Some(&meta), "token_file")
        ),
    };
    Err(format!("set only one of token and token_file ({both})"))
}

/// Every key, in a fixed order: when several values are wrong, the first
/// in this order is the one reported first (`independent_problems` adds
/// the others). (The keys after the timing checks
/// are validated inside the `Config { … }` literal, whose fields are
/// evaluated in the order written.)
fn validate(
    mut raw: Raw,
    mut v: Validator<'_>,
    credential: Option<CredentialToken>,
    secrets: &mut Vec<SecretString>,
) -> Result<Config, String> {
    // The dashboard's keys, the periods, then the rest in the literal's
    // order: the first error found is the one named.
    let access = dashboard_access(&mut raw, &mut v, credential, secrets)?;
    let periods = periods(
        &v,
        [
            raw.interval,
            raw.ping_interval,
            raw.ping_timeout,
            raw.backoff_max,
            raw.stop_grace,
            raw.confirm_timeout,
        ],
    )?;
    Ok(Config {
        url: access.url,
        token: access.token,
        token_source: access.token_source,
        allow_insecure_url: access.allow_insecure_url,
        repo_dir: v.repo_dir(raw.repo_dir)?,
        repo_url: v.repo_url(raw.repo_url)?,
        branch: v.branch(raw.branch)?,
        hostname: v.hostname(raw.hostname)?,
        log_level: v.log_level(raw.log_level)?,
        metrics: v.metrics(raw.metrics)?,
        stasysmo_dir: v.dir("stasysmo_dir", raw.stasysmo_dir)?,
        state_dir: v.dir("state_dir", raw.state_dir)?,
        ssh_key: v.ssh_key(raw.ssh_key)?,
        ca_file: v.ca_file(raw.ca_file)?,
        tls_client: v.tls_client(raw.tls_client_cert, raw.tls_client_key)?,
        interval: periods.interval,
        ping_interval: periods.ping_interval,
        ping_timeout: periods.ping_timeout,
        backoff_max: periods.backoff_max,
        stop_grace: periods.stop_grace,
        log_max_bytes: v.byte_size("log_max_bytes", raw.log_max_bytes)?,
        logs_max_bytes: v.byte_size("logs_max_bytes", raw.logs_max_bytes)?,
        theme_color: v.theme_color(raw.theme_color)?,
        location: v.one_of("location", raw.location, LOCATIONS)?,
        device_type: v.one_of("device_type", raw.device_type, DEVICE_TYPES)?,
        allow_reboot: v.allow_reboot(raw.allow_reboot)?,
        source_commit: v.source_commit(raw.source_commit)?,
        allowed_signers_file: v.allowed_signers_file(raw.allowed_signers_file)?,
        gpg_keyring: v.gpg_keyring(raw.gpg_keyring)?,
        report_agent_version: v.report_agent_version(raw.report_agent_version)?,
        metrics_textfile: v.metrics_textfile(raw.metrics_textfile)?,
        confirm_timeout: periods.confirm_timeout,
        rollback_on_failed_tests: v
            .boolean("rollback_on_failed_tests", raw.rollback_on_failed_tests)?,
        origins: origins(&v),
        warnings: v.warnings,
    })
}

/// The agent's periods, validated together (the ping timeout must outlast
/// the ping interval).
struct Periods {
    interval: Duration,
    ping_interval: Duration,
    ping_timeout: Duration,
    backoff_max: Duration,
    stop_grace: Duration,
    confirm_timeout: Duration,
}

/// `values`: interval, ping_interval, ping_timeout, backoff_max,
/// stop_grace and confirm_timeout, as read.
fn periods(v: &Validator<'_>, values: [Option<Value>; 6]) -> Result<Periods, String> {
    let [
        interval,
        ping_interval,
        ping_timeout,
        backoff_max,
        stop_grace,
        confirm,
    ] = values;
    let period = |key, value| v.duration(key, value, 1, MAX_PERIOD_SECS);
    let interval = period("interval", interval)?;
    let ping_interval = period("ping_interval", ping_interval)?;
    let ping_timeout = period("ping_timeout", ping_timeout)?;
    let backoff_max = period("backoff_max", backoff_max)?;
    let stop_grace = v.duration("stop_grace", stop_grace, 0, MAX_STOP_GRACE_SECS)?;
    v.ping_timeout_outlasts_interval(ping_interval, ping_timeout)?;
    Ok(Periods {
        interval,
        ping_interval,
        ping_timeout,
        backoff_max,
        stop_grace,
        confirm_timeout: v.duration("confirm_timeout", confirm, 0, MAX_CONFIRM_TIMEOUT_SECS)?,
    })
}

/// How the agent reaches the dashboard: the keys validated first.
struct DashboardAccess {
    url: String,
    token: SecretString,
    token_source: TokenSource,
    allow_insecure_url: bool,
}

/// `url`, the token and `allow_insecure_url`. The token is resolved (files
/// read) first so that its value can be scrubbed from any later message;
/// its errors are reported after url's.
fn dashboard_access(
    raw: &mut Raw,
    v: &mut Validator<'_>,
    credential: Option<CredentialToken>,
    secrets: &mut Vec<SecretString>,
) -> Result<DashboardAccess, String> {
    let setting = TokenSetting {
        inline: raw.token.as_ref(),
        file: raw.token_file.as_deref(),
    };
    let token = resolve_token(setting, v, credential, secrets);
    let url = v.url(raw.url.take())?;
    let allow_insecure_url = v.boolean("allow_insecure_url", raw.allow_insecure_url.take())?;
    v.url_is_private_or_allowed(&url, allow_insecure_url)?;
    let (token, token_source) = token?;
    check_token_not_in_url(&url, &token, v)?;
    Ok(DashboardAccess {
        url,
        token,
        token_source,
        allow_insecure_url,
    })
}

/// The source of every key that has a value.
fn origins(v: &Validator<'_>) -> BTreeMap<&'static str, String> {
    KEYS.iter()
        .filter(|key| v.has(key))
        .map(|key| (*key, v.origin(key)))
        .collect()
}
