//! `embed-worker enqueue [FILE.jsonl|-]`: XADD JSON lines with pipelining. Bad lines are
//! reported with their line number and skipped; the rest go in.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::process::ExitCode;

use crate::settings::Settings;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// JSON Lines file, or - (default) for stdin.
    #[arg(default_value = "-")]
    pub file: String,
    /// Entries per pipelined round trip.
    #[arg(long, default_value_t = 500)]
    pub pipeline: usize,
}

/// One JSON object as stream fields: strings as they are, other values as JSON text.
pub fn fields_of(line: &str) -> Result<Vec<(String, String)>, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err("not a JSON object".into());
    };
    if map.is_empty() {
        return Err("empty object".into());
    }
    Ok(map
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect())
}

pub fn execute(settings: Settings, args: Args) -> anyhow::Result<ExitCode> {
    // Total bytes, when known, turn the progress counter into a percentage.
    let (reader, total_bytes): (Box<dyn BufRead>, Option<u64>) = if args.file == "-" {
        (Box::new(BufReader::new(std::io::stdin())), None)
    } else {
        let file =
            std::fs::File::open(&args.file).map_err(|e| anyhow::anyhow!("{}: {e}", args.file))?;
        let size = file.metadata().ok().map(|m| m.len()).filter(|&n| n > 0);
        (Box::new(BufReader::new(file)), size)
    };
    let store = Store::new(&settings.redis)?;
    let stream = settings.stream.name.clone();
    let router = crate::store::shards::Router::new(&settings.stream);
    let progress = std::io::stderr().is_terminal();
    let (added, skipped) = super::runtime()?.block_on(async {
        let mut conn = store.connect().await?;
        let (mut added, mut skipped) = (0u64, 0u64);
        let mut pipe = ::redis::pipe();
        let mut queued = 0usize;
        let mut bytes_read = 0u64;
        for (n, line) in reader.lines().enumerate() {
            let line = line?;
            bytes_read += line.len() as u64 + 1;
            if line.trim().is_empty() {
                continue;
            }
            match fields_of(&line) {
                Ok(fields) => {
                    let cmd = pipe.cmd("XADD").arg(router.key_for(&fields)).arg("*");
                    for (k, v) in fields {
                        cmd.arg(k).arg(v);
                    }
                    cmd.ignore();
                    queued += 1;
                }
                Err(e) => {
                    eprintln!("line {}: {e}; skipped", n + 1);
                    skipped += 1;
                }
            }
            if queued >= args.pipeline.max(1) {
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| store.error(e))?;
                added += queued as u64;
                queued = 0;
                pipe = ::redis::pipe();
                if progress {
                    match total_bytes {
                        Some(total) => eprint!(
                            "\renqueued {added} ({:.0}%)",
                            100.0 * bytes_read.min(total) as f64 / total as f64
                        ),
                        None => eprint!("\renqueued {added}"),
                    }
                    let _ = std::io::stderr().flush();
                }
            }
        }
        if queued > 0 {
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| store.error(e))?;
            added += queued as u64;
        }
        if progress {
            eprintln!();
        }
        anyhow::Ok((added, skipped))
    })?;
    let shards = match settings.stream.shards {
        1 => String::new(),
        n => format!(" ({n} shards)"),
    };
    eprintln!("enqueued {added} entries to {stream}{shards}; skipped {skipped} bad lines");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::fields_of;

    #[test]
    fn json_lines_become_fields() {
        let f = fields_of(r#"{"id":"0","content":"hi","n":3}"#).unwrap();
        assert_eq!(
            f,
            vec![
                ("id".into(), "0".into()),
                ("content".into(), "hi".into()),
                ("n".into(), "3".into())
            ]
        );
        assert!(fields_of("[1]").is_err());
        assert!(fields_of("{").is_err());
        assert!(fields_of("{}").is_err());
    }
}
