//! `embed-worker bench-model`: the model-only ceiling for `make bench`. Texts (one per line)
//! are tokenised and cut into length-sorted batches exactly as the worker's batcher does with
//! `batch.max_docs` / `batch.max_tokens`, then run through the model thread with no Redis.
//! Model loading and one warm-up batch are timed apart, so the rate is steady-state inference.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use crate::model::{Encoded, Model};
use crate::pipeline::batch::{padded_tokens, plan, BatchLimits};
use crate::settings::Settings;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// File of texts, one per line; stdin without it.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Keep arrival order instead of sorting by length (batches of `batch.max_docs`).
    #[arg(long)]
    pub unsorted: bool,
}

pub fn execute(settings: Settings, args: Args) -> anyhow::Result<ExitCode> {
    let texts: Vec<String> = match &args.file {
        Some(path) => std::io::BufReader::new(std::fs::File::open(path)?)
            .lines()
            .collect::<Result<_, _>>()?,
        None => std::io::stdin().lock().lines().collect::<Result<_, _>>()?,
    };
    let started = Instant::now();
    let model = Model::load(&settings)?;
    let load_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let encoded = texts
        .iter()
        .map(|t| model.tokenizer.encode_one(t))
        .collect::<Result<Vec<Encoded>, _>>()?;
    let tokenize_s = started.elapsed().as_secs_f64();

    let limits = BatchLimits::from_settings(&settings.batch);
    let lengths: Vec<usize> = encoded.iter().map(Encoded::len).collect();
    let batches: Vec<Vec<usize>> = if args.unsorted {
        let all: Vec<usize> = (0..lengths.len()).collect();
        all.chunks(limits.max_docs.max(1))
            .map(<[usize]>::to_vec)
            .collect()
    } else {
        plan(&lengths, limits)
    };
    let gather = |idx: &[usize]| idx.iter().map(|&i| encoded[i].clone()).collect::<Vec<_>>();
    if let Some(first) = batches.first() {
        model.handle.embed_blocking(gather(first))?; // warm-up: first-run allocations
    }
    let started = Instant::now();
    let mut padded = 0;
    for idx in &batches {
        padded += padded_tokens(idx.iter().map(|&i| lengths[i]));
        model.handle.embed_blocking(gather(idx))?;
    }
    let model_s = started.elapsed().as_secs_f64();
    let docs = texts.len();
    let tokens: usize = lengths.iter().sum();
    let report = serde_json::json!({
        "model": settings.model_path().display().to_string(),
        "docs": docs,
        "tokens": tokens,
        "padded_tokens": padded,
        "batches": batches.len(),
        "load_s": load_s,
        "tokenize_s": tokenize_s,
        "model_s": model_s,
        "docs_per_s": docs as f64 / model_s.max(1e-9),
        "tokens_per_s": tokens as f64 / model_s.max(1e-9),
    });
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &report)?;
    out.write_all(b"\n")?;
    Ok(ExitCode::SUCCESS)
}
