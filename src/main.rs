//! Thin entry: parse the command line, run (which starts tracing once the
//! configuration says in which format), and turn the result into an exit
//! code (0 done, 1 failed with one line on stderr, 2 usage error — clap's own).

use clap::Parser;

fn main() {
    let cli = crmgate::cli::Cli::parse();
    let code = match crmgate::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("crmgate: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
