use clap::Parser;
use nixfleet_agent::activation::timer::ROLLBACK_ARG;
use nixfleet_agent::commands::launch::SUPERVISE_ARG;
use nixfleet_agent::config::{self, Cli, Command};
use nixfleet_agent::signature::VERIFY_ARG;
use std::process::ExitCode;

fn main() -> ExitCode {
    // The hidden mode that supervises one command (see commands/supervisor.rs).
    if std::env::args_os().nth(1).as_deref() == Some(SUPERVISE_ARG.as_ref()) {
        return nixfleet_agent::commands::supervisor::main();
    }
    // The hidden mode a command's supervisor runs to check a commit's
    // signature (see signature.rs).
    if std::env::args_os().nth(1).as_deref() == Some(VERIFY_ARG.as_ref()) {
        return nixfleet_agent::signature::main();
    }
    // The hidden mode a systemd timer runs when a switch's countdown ends
    // (see commands/unattended.rs).
    if std::env::args_os().nth(1).as_deref() == Some(ROLLBACK_ARG.as_ref()) {
        return nixfleet_agent::commands::unattended::main();
    }
    // Before anything secret is read.
    let dumpable = nixfleet_agent::hardening::forbid_core_dumps();
    let cli = Cli::parse();
    if let Some(Command::Status { json }) = cli.command {
        return status(&cli, json);
    }
    let config = match config::load(&cli) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("nixfleet-agent: {error}");
            return ExitCode::from(config::EXIT_CONFIG);
        }
    };
    if cli.check_config {
        print!("{}", config.render());
        return ExitCode::SUCCESS;
    }
    nixfleet_agent::logging::init(&config.log_level);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    if let Err(error) = dumpable {
        tracing::warn!("{error}");
    }
    // One thread is plenty for one socket and a few pipes, and keeps the
    // agent's footprint small on every host.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("nixfleet-agent: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(nixfleet_agent::agent::run(config));
    // Dropping the runtime would wait for its blocking threads; the only
    // one the agent starts waits in `flock` for the rollback timer's lock,
    // which may be held for minutes. A stop must not wait for that.
    runtime.shutdown_background();
    code
}

/// `nixfleet-agent status`: reads the running agent's state file.
fn status(cli: &Cli, json: bool) -> ExitCode {
    use nixfleet_agent::observe::report;
    let (state_dir, origin) = match config::load_state_dir(cli) {
        Ok(found) => found,
        Err(error) => {
            eprintln!("nixfleet-agent: {error}");
            return ExitCode::from(config::EXIT_CONFIG);
        }
    };
    let report = report::report(&state_dir, &origin, json);
    print!("{}", report.text);
    ExitCode::from(report.exit_code)
}
