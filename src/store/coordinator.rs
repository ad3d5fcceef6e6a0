//! Whether a cluster's search module has a coordinator (FT.* on any node covers every primary)
//! or not (every primary has its own index: [`super::fanout`]). Asked of every primary, and
//! remembered per [`super::Store`] for [`RECHECK`], since every index call (the readiness
//! probe's each second, the index keeper's every 5 s, each search) needs the answer.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::redis::Value;

use super::cluster::Conn;

/// How long an answer stands. A rolling upgrade that adds or removes the coordinator is seen
/// within this long; until then the old answer holds, which is exact when the coordinator was
/// added (fanning out to coordinated primaries costs duplicate work; merging drops duplicate
/// keys) and, when one was removed, searches that primary's shard alone for up to this long.
pub const RECHECK: Duration = Duration::from_secs(60);

/// The last answer, shared by every connection of one `Store`. A failed question is not
/// remembered: it answers "no coordinator" (the safe side) and is asked again next time.
#[derive(Debug, Default)]
pub struct Memo(Mutex<Option<(Instant, bool)>>);

impl Memo {
    fn fresh(&self, now: Instant) -> Option<bool> {
        let last = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        last.filter(|(at, _)| now.duration_since(*at) < RECHECK)
            .map(|(_, known)| known)
    }

    /// Stores `found`; true when it differs from the previous answer (none counts as false).
    fn remember(&self, now: Instant, found: bool) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let before = last.is_some_and(|(_, known)| known);
        *last = Some((now, found));
        before != found
    }
}

/// Whether the cluster's search module has a coordinator, so that FT.* on any node covers
/// every primary. A module built with one (Redis 8's Query Engine, RSCoordinator, Redis
/// Enterprise) registers its shard-local commands as `_FT.SEARCH`, `_FT.INFO`..., and its
/// cluster commands `SEARCH.CLUSTERINFO` (`FT.CLUSTERINFO` before 2.0); a module without one
/// registers none of them (redis-stack's RediSearch 2.10 here: COMMAND INFO answers nil for
/// each). Every primary must have one, as in a rolling upgrade a coordinator fanning out to a
/// primary without `_FT.SEARCH` fails. Anything else (an error, COMMAND refused by an ACL, a
/// proxy hiding internal commands) reads as no coordinator, the safe side: fanning out from
/// here to coordinated primaries costs duplicate work, but results stay exact (merging drops
/// duplicate keys), whereas trusting a missing coordinator would search one shard of many.
/// False on one server, where every index command covers every document already.
pub async fn coordinated(conn: &mut Conn) -> bool {
    let Conn::Cluster(_, _, memo) = conn else {
        return false;
    };
    if let Some(known) = memo.fresh(Instant::now()) {
        return known;
    }
    let memo = memo.clone();
    let Some(found) = ask(conn).await else {
        return false;
    };
    if memo.remember(Instant::now(), found) {
        if found {
            tracing::info!(
                "the cluster's search module has a coordinator: one index for the whole cluster"
            );
        } else {
            tracing::info!("the cluster's search module has no coordinator: one index per primary");
        }
    }
    found
}

/// Whether index commands must go to every primary's own index: a cluster without coordinator.
pub async fn per_shard(conn: &mut Conn) -> bool {
    conn.is_cluster() && !coordinated(conn).await
}

/// COMMAND INFO of the coordinator's commands on every primary; None when that failed.
async fn ask(conn: &mut Conn) -> Option<bool> {
    let mut cmd = ::redis::cmd("COMMAND");
    cmd.arg("INFO")
        .arg("_FT.SEARCH")
        .arg("SEARCH.CLUSTERINFO")
        .arg("FT.CLUSTERINFO");
    match conn.on_primaries(&cmd).await {
        Ok(replies) => Some(
            !replies.is_empty()
                && replies
                    .iter()
                    .all(|r| r.reply.as_ref().is_ok_and(names_a_command)),
        ),
        Err(e) => {
            tracing::debug!(error = %e, "COMMAND INFO failed: taking the search module for one without a coordinator");
            None
        }
    }
}

/// A COMMAND INFO reply that describes at least one of the commands asked about.
fn names_a_command(reply: &Value) -> bool {
    match reply {
        Value::Array(entries) | Value::Set(entries) => {
            entries.iter().any(|e| !matches!(e, Value::Nil))
        }
        Value::Map(entries) => !entries.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_info_names_a_command_unless_all_nil() {
        assert!(!names_a_command(&Value::Array(vec![
            Value::Nil,
            Value::Nil
        ])));
        assert!(names_a_command(&Value::Array(vec![
            Value::Nil,
            Value::Array(vec![Value::SimpleString("_ft.search".into())]),
        ])));
        assert!(!names_a_command(&Value::Nil));
    }

    #[test]
    fn an_answer_stands_for_recheck_then_is_asked_again() {
        let memo = Memo::default();
        let t0 = Instant::now();
        assert_eq!(memo.fresh(t0), None);
        assert!(!memo.remember(t0, false), "the first 'no' is no change");
        assert_eq!(memo.fresh(t0 + RECHECK / 2), Some(false));
        assert_eq!(memo.fresh(t0 + RECHECK), None);
        assert!(memo.remember(t0 + RECHECK, true), "a coordinator appeared");
        assert_eq!(memo.fresh(t0 + RECHECK), Some(true));
        assert!(!memo.remember(t0 + RECHECK * 2, true));
    }
}
