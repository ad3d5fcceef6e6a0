//! Thin entry point: parse the command line, load settings, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = embed_worker::commands::Cli::parse();
    match embed_worker::commands::execute(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line, with the cause chain: what failed and how to fix it.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                msg.push_str(": ");
                msg.push_str(&cause.to_string());
            }
            eprintln!("embed-worker: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
