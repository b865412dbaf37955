use clap::Parser;
use nixfleet_agent::config::{self, Cli};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    ExitCode::SUCCESS
}
