//! `embed-worker reindex --model-file FILE [--drop-old]`: moves the index to another model with
//! no downtime for queries and no re-feed by producers.
//!
//! 1. **Begin.** A new FT index `<index.name>@<fingerprint>` over the same documents, its vectors
//!    in their own field `<vector_field>@<fingerprint>` (queried `AS <vector_field>`), and the
//!    model record's `next_*` naming it. Workers of the current model go on writing.
//! 2. **Pass.** Every stored hash (SCAN) lacking the next model's vector is embedded again from
//!    its stored text and given it (`ew_reembed`, which skips a hash rewritten since it was read).
//! 3. **Catch up.** A worker's upsert replaces the whole document, so whatever was written since
//!    lacks the next vector again; the next index finds those (`-@__ew_model:{<fingerprint>}`)
//!    and they are embedded again, round after round, while workers write.
//! 4. **Hold and switch.** The record's `writers` is emptied, so every document function refuses
//!    the old model's workers (they stop, leaving their entries pending); the last documents are
//!    caught up; then `index.name` becomes an alias of the new index and the record names the new
//!    model. Workers of the new model, waiting at start-up, start; queries never stop.
//! 5. **Drop old** (`--drop-old`, now or in a later run): the previous model's index and vectors.
//!
//! Every step is resumable: a crash leaves the record saying where it was, and running the same
//! command again goes on from there (a hash that has the next vector is skipped). Once switched,
//! running it again does nothing.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::store::cluster::Conn;
use ::redis::RedisError;
use anyhow::{bail, Context};

use crate::model::Model;
use crate::settings::Settings;
use crate::store::documents::{DocStore, ENTRY_FIELD, MODEL_FIELD, VERSION_FIELD};
use crate::store::generation::{self, Generation, Phase, Record};
use crate::store::library::{self, DocFn};
use crate::store::reindex::{glob_escape, lacking, scan, wait_indexed, write_vectors, Written};
use crate::store::reply::text;
use crate::store::{index, Store};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The ONNX file of the model to move to, in model.dir (as model.file names it).
    #[arg(long, value_name = "FILE")]
    pub model_file: String,
    /// Once switched, remove the previous model's index and its vectors from every document.
    #[arg(long)]
    pub drop_old: bool,
    /// Texts per model call.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Only the pass, over part I of N of the documents (by a hash of the key), then exit: run
    /// N of these at once (e.g. a Job with N completions), then once without --part to catch
    /// up and switch.
    #[arg(long, value_name = "I/N", value_parser = parse_part)]
    pub part: Option<(u64, u64)>,
}

fn parse_part(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("{s:?}: expected I/N with 0 <= I < N, e.g. 0/4");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (u64, u64) = (i.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// Which part of `n` the key `key` falls in (FNV-1a: stable across processes and versions).
fn part_of(key: &str, n: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % n
}

/// Catch-up rounds run while workers write until fewer documents than this are left; the rest
/// are done with writers held off (a pause in indexing, never in queries).
const HOLD_BELOW: usize = 200;
/// Catch-up rounds while workers write, at most (a write rate above the re-embed rate never
/// converges; then the hold takes what is left).
const MAX_OPEN_ROUNDS: usize = 20;
/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

pub fn execute(settings: Settings, args: Args) -> anyhow::Result<ExitCode> {
    let mut next_settings = settings.clone();
    next_settings.model.file = args.model_file.clone();
    let model = Model::load(&next_settings)?;
    let store = Store::new(&settings.redis)?;
    super::runtime()?.block_on(async {
        let mut conn = store.connect().await?;
        if conn.is_cluster() {
            // The switch is one MULTI over the record, the index and its alias, and the document
            // functions check the record on each write: neither holds across a cluster's slots.
            anyhow::bail!(
                "reindex does not run on a Redis Cluster yet ({}): the switch and the per-write \
                 model check need the record and the documents on one node. Build the new index \
                 with a second fleet writing to another index.name, then move readers to it",
                store.url
            );
        }
        let mut run = Reindex {
            settings: &settings,
            model: &model,
            batch: args.batch.max(1),
            key: generation::record_key(&settings.index.name),
            part: args.part,
            store: store.clone(),
            docs: DocStore::from_settings(&settings),
        };
        run.execute(&mut conn, args.drop_old)
            .await
            .map_err(|e| match e.downcast::<RedisError>() {
                Ok(e) => anyhow::Error::from(store.error(e)),
                Err(e) => e,
            })
    })
}

struct Reindex<'a> {
    settings: &'a Settings,
    model: &'a Model,
    batch: usize,
    /// The model record's key.
    key: String,
    /// Only this part's pass (`--part`).
    part: Option<(u64, u64)>,
    store: Store,
    /// How vectors are stored (hash bytes or JSON arrays).
    docs: DocStore,
}

/// Counts of one pass or catch-up round.
#[derive(Debug, Default)]
struct Tally {
    seen: u64,
    embedded: u64,
    /// Already had the next vector.
    had: u64,
    /// Rewritten by a worker between the read and the write (caught up later).
    changed: u64,
    /// Not written by embed-worker (no version): left as they are, without the next vector.
    foreign: Vec<String>,
}

impl Reindex<'_> {
    async fn execute(&mut self, conn: &mut Conn, drop_old: bool) -> anyhow::Result<ExitCode> {
        if library::ensure(conn).await? {
            eprintln!("reindex: loaded the embed_worker function library");
        }
        let fp = self.model.fingerprint.id.clone();
        let name = &self.settings.index.name;
        let Some(record) = generation::load(conn, &self.key).await? else {
            bail!(
                "index {name} has no model record ({}): start a worker on it first (it records its \
                 model), then reindex",
                self.key
            );
        };
        let next = match &record.next {
            None if record.current.fingerprint == fp => {
                println!(
                    "index {name} is on {} [{}] already: nothing to move",
                    record.current.model, record.current.fingerprint
                );
                if drop_old {
                    self.drop_old(conn, &record).await?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            Some((next, _)) if next.fingerprint != fp => bail!(
                "index {name} is being moved to {} [{}] by another reindex; finish that one \
                 (`embed-worker reindex --model-file` with its file) before starting another",
                next.model,
                next.fingerprint
            ),
            Some((next, _)) => {
                eprintln!(
                    "reindex: resuming the move of {name} from {} [{}] to {}",
                    record.current.model, record.current.fingerprint, self.model.fingerprint
                );
                next.clone()
            }
            None => {
                if record.old.is_some() {
                    eprintln!(
                        "reindex: first removing the vectors of the model before the current one"
                    );
                    self.drop_old(conn, &record).await?;
                }
                self.begin(conn, &record).await?
            }
        };
        let record = generation::load(conn, &self.key)
            .await?
            .context("the model record vanished during the reindex")?;
        let started = Instant::now();
        if let Some((i, n)) = self.part {
            if !matches!(record.next, Some((_, Phase::Migrating))) {
                println!("the reindex is past its pass: nothing for part {i}/{n} to do");
                return Ok(ExitCode::SUCCESS);
            }
            let pass = self.pass(conn, &next, &record.current).await?;
            println!(
                "part {i}/{n} done in {:.1}s: {} embedded, {} had the new vector. Run reindex without \
                 --part once every part is done, to catch up and switch",
                started.elapsed().as_secs_f64(),
                pass.embedded,
                pass.had
            );
            return Ok(ExitCode::SUCCESS);
        }
        if matches!(record.next, Some((_, Phase::Migrating))) {
            let pass = self.pass(conn, &next, &record.current).await?;
            eprintln!(
                "reindex: pass done in {:.1}s: {} hashes seen, {} embedded, {} had the new vector, \
                 {} rewritten meanwhile (caught up next)",
                started.elapsed().as_secs_f64(),
                pass.seen,
                pass.embedded,
                pass.had,
                pass.changed
            );
            wait_indexed(conn, &next.index, PROGRESS_EVERY).await?;
            let mut rounds = 0;
            loop {
                let round = self.catch_up(conn, &next).await?;
                rounds += 1;
                let left = round.embedded + round.changed;
                if (left as usize) < HOLD_BELOW || rounds >= MAX_OPEN_ROUNDS {
                    break;
                }
            }
            self.hold(conn).await?;
        }
        // Writers are held off: the last documents, until none lacks the next vector.
        let foreign = loop {
            let round = self.catch_up(conn, &next).await?;
            if round.embedded + round.changed == 0 {
                break round.foreign;
            }
        };
        if !foreign.is_empty() {
            eprintln!(
                "reindex: {} hash(es) under {} were not written by embed-worker (no {VERSION_FIELD}) \
                 and stay without the new vector, e.g. {}",
                foreign.len(),
                self.settings.index.prefix,
                foreign[0]
            );
        }
        self.switch(conn, &record.current, &next).await?;
        println!(
            "index {name} moved to {} [{}] in {:.1}s; workers of {} [{}] are refused from now on",
            next.model,
            next.fingerprint,
            started.elapsed().as_secs_f64(),
            record.current.model,
            record.current.fingerprint
        );
        if drop_old {
            let record = generation::load(conn, &self.key)
                .await?
                .context("the model record vanished")?;
            self.drop_old(conn, &record).await?;
        }
        Ok(ExitCode::SUCCESS)
    }

    /// Creates the next model's index and names it in the record.
    async fn begin(&self, conn: &mut Conn, record: &Record) -> anyhow::Result<Generation> {
        let s = &self.settings.index;
        let fp = &self.model.fingerprint;
        let next = Generation {
            fingerprint: fp.id.clone(),
            model: fp.name.clone(),
            index: format!("{}@{}", s.name, fp.id),
            vector_field: format!("{}@{}", s.vector_field, fp.id),
        };
        let wanted = index::Wanted {
            settings: s,
            layout: index::Layout {
                name: &next.index,
                vector_field: &next.vector_field,
                model_tag: true,
            },
            parent: self.settings.parent_field(),
            dim: self.model.handle.dimension(),
        };
        index::ensure(&self.store, conn, &wanted).await?;
        generation::name_next(conn, &self.key, &next).await?;
        eprintln!(
            "reindex: moving {} from {} [{}] to {}: new index {} (vectors in {})",
            s.name,
            record.current.model,
            record.current.fingerprint,
            fp,
            next.index,
            next.vector_field
        );
        Ok(next)
    }

    /// Every stored hash under the prefix, once (SCAN).
    async fn pass(
        &self,
        conn: &mut Conn,
        next: &Generation,
        current: &Generation,
    ) -> anyhow::Result<Tally> {
        let total = index::info(conn, &current.index)
            .await?
            .and_then(|info| {
                info.iter()
                    .find(|(k, _)| k == "num_docs")
                    .and_then(|(_, v)| text(v).parse::<f64>().ok())
            })
            .unwrap_or(0.0) as u64;
        let pattern = format!("{}*", glob_escape(&self.settings.index.prefix));
        let mut tally = Tally::default();
        let mut cursor: u64 = 0;
        let mut inflight = None;
        let started = Instant::now();
        let mut said = Instant::now();
        loop {
            let (next_cursor, keys) =
                scan(conn, self.settings.index.storage, cursor, &pattern).await?;
            let keys: Vec<String> = match self.part {
                Some((i, n)) => keys.into_iter().filter(|k| part_of(k, n) == i).collect(),
                None => keys,
            };
            self.embed_keys(conn, next, &keys, &mut tally, &mut inflight)
                .await?;
            if said.elapsed() >= PROGRESS_EVERY {
                said = Instant::now();
                let rate = tally.embedded as f64 / started.elapsed().as_secs_f64();
                eprintln!(
                    "reindex: {} of ~{total} hashes seen, {} embedded ({rate:.0}/s), {} had it",
                    tally.seen, tally.embedded, tally.had
                );
            }
            cursor = next_cursor;
            if cursor == 0 {
                settle(&mut inflight, &mut tally, next).await?;
                return Ok(tally);
            }
        }
    }

    /// One round over the hashes the next index finds without the next model's vector: as many
    /// as it found when the round began (more written meanwhile wait for the next round).
    async fn catch_up(&self, conn: &mut Conn, next: &Generation) -> anyhow::Result<Tally> {
        let mut tally = Tally::default();
        let query = format!("-@{MODEL_FIELD}:{{{}}}", next.fingerprint);
        let mut budget: Option<u64> = None;
        let mut inflight = None;
        loop {
            // Hashes left as they are (foreign) stay in the answer: page past them.
            let (total, keys) = lacking(conn, &next.index, &query, tally.foreign.len()).await?;
            let budget = *budget.get_or_insert(total);
            if keys.is_empty() || tally.seen >= budget {
                break;
            }
            self.embed_keys(conn, next, &keys, &mut tally, &mut inflight)
                .await?;
            // The next query must see these written.
            settle(&mut inflight, &mut tally, next).await?;
        }
        if tally.embedded + tally.changed > 0 {
            eprintln!(
                "reindex: caught up {} document(s) written meanwhile ({} rewritten again)",
                tally.embedded, tally.changed
            );
        }
        Ok(tally)
    }

    /// Reads `keys`, embeds those lacking the next vector with the next model, and writes them;
    /// the last batch's write may still be in flight (`settle` it).
    async fn embed_keys(
        &self,
        conn: &mut Conn,
        next: &Generation,
        keys: &[String],
        tally: &mut Tally,
        inflight: &mut Option<Written>,
    ) -> anyhow::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let text_field = self.settings.stream.text_field.as_str();
        let rows = crate::store::reindex::read_fields(
            conn,
            self.settings.index.storage,
            keys,
            &[text_field, VERSION_FIELD, ENTRY_FIELD, MODEL_FIELD],
        )
        .await?;
        let utf8 = |v: Option<Vec<u8>>| v.map(|b| String::from_utf8_lossy(&b).into_owned());
        // (key, version, entry, text) still to embed.
        let mut todo: Vec<(&str, String, String, String)> = Vec::new();
        for (key, row) in keys.iter().zip(rows) {
            tally.seen += 1;
            let [t, version, entry, models] = <[Option<Vec<u8>>; 4]>::try_from(row)
                .map_err(|_| anyhow::anyhow!("the wrong number of fields read for {key}"))?;
            let (Some(version), Some(entry)) = (utf8(version), utf8(entry)) else {
                tally.foreign.push(key.clone());
                continue;
            };
            if utf8(models)
                .unwrap_or_default()
                .split_whitespace()
                .any(|m| m == next.fingerprint)
            {
                tally.had += 1;
                continue;
            }
            todo.push((key, version, entry, utf8(t).unwrap_or_default()));
        }
        // Sorted by length, so a batch pads little; each batch's writes go out while the next
        // batch is embedded.
        todo.sort_by_key(|(_, _, _, t)| t.len());
        for part in todo.chunks(self.batch) {
            let texts: Vec<&str> = part.iter().map(|(_, _, _, t)| t.as_str()).collect();
            let encoded = self.model.tokenizer.encode(&texts)?;
            let vectors = self.model.handle.embed(encoded).await?;
            settle(inflight, tally, next).await?;
            let rows = part
                .iter()
                .map(|(k, v, e, _)| (k.to_string(), v.clone(), e.clone()))
                .collect();
            let vectors = vectors.iter().map(|v| self.docs.vector(v)).collect();
            *inflight = Some(tokio::spawn(write_vectors(
                conn.clone(),
                DocFn::Reembed.name(self.docs.storage),
                self.key.clone(),
                next.fingerprint.clone(),
                rows,
                vectors,
            )));
        }
        Ok(())
    }

    /// Holds every writer off: the document functions refuse all models from now on.
    async fn hold(&self, conn: &mut Conn) -> Result<(), RedisError> {
        generation::hold_writers(conn, &self.key).await?;
        eprintln!("reindex: writers held off for the last documents");
        Ok(())
    }

    /// `index.name` becomes the new index (an alias), and the record names the new model, in one
    /// MULTI: queries see the old index or the new one, never neither.
    async fn switch(
        &self,
        conn: &mut Conn,
        current: &Generation,
        next: &Generation,
    ) -> Result<(), RedisError> {
        let name = &self.settings.index.name;
        let mut tx = ::redis::pipe();
        tx.atomic();
        // The first model's index holds the name itself: it goes (its documents stay), and the
        // name comes back at once as the alias.
        if current.index == *name && !self.is_alias(conn).await? {
            tx.cmd("FT.DROPINDEX").arg(name).ignore();
        }
        tx.cmd("FT.ALIASUPDATE").arg(name).arg(&next.index).ignore();
        generation::push_switch(&mut tx, &self.key, current, next);
        let () = tx.query_async(conn).await?;
        Ok(())
    }

    /// Whether `index.name` is an alias (or gone) rather than the first model's index.
    async fn is_alias(&self, conn: &mut Conn) -> Result<bool, RedisError> {
        let info = index::info(conn, &self.settings.index.name).await?;
        Ok(info.is_none_or(|i| {
            i.iter()
                .find(|(k, _)| k == "index_name")
                .is_some_and(|(_, v)| text(v) != self.settings.index.name)
        }))
    }

    /// Removes the previous model's index (unless it was the first, already gone at the switch)
    /// and its vector from every hash.
    async fn drop_old(&self, conn: &mut Conn, record: &Record) -> anyhow::Result<()> {
        let Some(old) = &record.old else {
            println!("no previous model's vectors to remove");
            return Ok(());
        };
        if old.index != self.settings.index.name && index::info(conn, &old.index).await?.is_some() {
            index::drop(conn, &old.index, false).await?;
        }
        let pattern = format!("{}*", glob_escape(&self.settings.index.prefix));
        let mut cursor: u64 = 0;
        let mut retired = 0u64;
        loop {
            let (next_cursor, keys) =
                scan(conn, self.settings.index.storage, cursor, &pattern).await?;
            if !keys.is_empty() {
                let mut pipe = ::redis::pipe();
                for key in &keys {
                    pipe.cmd("FCALL")
                        .arg(DocFn::Retire.name(self.settings.index.storage))
                        .arg(2)
                        .arg(key)
                        .arg(&self.key)
                        .arg(&old.vector_field)
                        .arg(&old.fingerprint);
                }
                let answers: Vec<String> = pipe.query_async(conn).await?;
                for a in answers {
                    match a.as_str() {
                        "retired" => retired += 1,
                        "none" => {}
                        _ => bail!("refused to remove the vectors of the index's own model"),
                    }
                }
            }
            cursor = next_cursor;
            if cursor == 0 {
                break;
            }
        }
        generation::forget_old(conn, &self.key).await?;
        println!(
            "removed {} [{}]: its index {} and its vectors from {retired} hash(es)",
            old.model, old.fingerprint, old.index
        );
        Ok(())
    }
}

/// Waits for the write in flight, if any, and counts its answers.
async fn settle(
    inflight: &mut Option<Written>,
    tally: &mut Tally,
    next: &Generation,
) -> anyhow::Result<()> {
    let Some(write) = inflight.take() else {
        return Ok(());
    };
    for answer in write.await?? {
        match answer.as_str() {
            "written" => tally.embedded += 1,
            "changed" => tally.changed += 1,
            other => bail!(
                "the model record no longer names {} as the next model ({other}): another \
                 reindex or an `index drop` changed it; run reindex again",
                next.fingerprint
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_split_the_keys_and_parse_strictly() {
        assert_eq!(parse_part("0/4"), Ok((0, 4)));
        assert_eq!(parse_part("3/4"), Ok((3, 4)));
        for bad in ["4/4", "1/0", "x/2", "1", "-1/2"] {
            assert!(parse_part(bad).is_err(), "{bad}");
        }
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            counts[part_of(&format!("doc:{i}"), 4) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(part_of("doc:7", 4), part_of("doc:7", 4));
    }
}
