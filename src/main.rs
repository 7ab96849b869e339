//! Thin entry: parse the command line, start tracing, run, and turn the
//! result into an exit code (0 done, 1 failed with one line on stderr,
//! 2 usage error — clap's own).

use std::io::IsTerminal;

use clap::Parser;

fn main() {
    let cli = crmgate::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CRMGATE_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,rusqlite_migration=warn")
            }),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let code = match crmgate::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("crmgate: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
