//! `embed-worker embed [TEXT...]`: one JSON array per text, in input order.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use crate::model::Model;
use crate::settings::Settings;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Texts to embed; without any, one text per line is read from stdin.
    pub texts: Vec<String>,
    /// Texts per model call when reading stdin.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
}

pub fn execute(settings: Settings, args: Args) -> anyhow::Result<ExitCode> {
    let model = Model::load(&settings)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut emit = |texts: &[String]| -> anyhow::Result<()> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        for v in model.embed_texts_blocking(&refs)? {
            serde_json::to_writer(&mut out, &v)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    };
    if !args.texts.is_empty() {
        for chunk in args.texts.chunks(args.batch.max(1)) {
            emit(chunk)?;
        }
    } else {
        let mut chunk = Vec::with_capacity(args.batch);
        for line in std::io::stdin().lock().lines() {
            chunk.push(line?);
            if chunk.len() >= args.batch.max(1) {
                emit(&chunk)?;
                chunk.clear();
            }
        }
        if !chunk.is_empty() {
            emit(&chunk)?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
