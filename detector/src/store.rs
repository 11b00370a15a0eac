//! The embedded store (sled): what must survive a restart.
//!
//! Every value is a `meshwatch.v1` protobuf message. Calls block on disk I/O: the async side
//! runs them under `spawn_blocking`.

use std::path::Path;

use meshwatch_collector::window::PairKey;
use meshwatch_proto::v1;
use prost::Message;
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store in {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("store I/O failed: {0}")]
    Io(#[from] sled::Error),
}

#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    pairs: sled::Tree,
    models: sled::Tree,
    meta: sled::Tree,
    /// Notifications to deliver: receiver name, a zero byte, a sequence number (big endian).
    outbox: sled::Tree,
    /// Notifications given up on, keyed as in the outbox.
    dead: sled::Tree,
    /// Silences by id.
    silences: sled::Tree,
}

/// A notification in the outbox or the dead-letter list, with the key it is stored under.
#[derive(Clone, Debug, PartialEq)]
pub struct Queued {
    pub key: Vec<u8>,
    pub receiver: String,
    pub notification: crate::alert::Notification,
}

/// A notification given up on, and why.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    pub receiver: String,
    pub reason: String,
    /// Wall time it was given up, Unix milliseconds.
    pub dead_at_ms: i64,
    pub attempts: u32,
    pub notification: crate::alert::Notification,
}

const ALERTS_KEY: &[u8] = b"alerts";

/// Dead letters kept, across receivers.
pub const MAX_DEAD_LETTERS: usize = 10_000;

fn outbox_prefix(receiver: &str) -> Vec<u8> {
    let mut k = receiver.as_bytes().to_vec();
    k.push(0);
    k
}

const ANOMALIES_KEY: &[u8] = b"anomalies";
const TRUST_KEY: &[u8] = b"trust";

/// A detector checkpoint as read back: models by pair key, the anomalies, the last window.
#[derive(Debug, Default)]
pub struct StoredCheckpoint {
    pub models: Vec<(v1::PairKey, Vec<u8>)>,
    pub anomalies: Option<Vec<u8>>,
    /// The zero-trust state (edge book, principals, open findings).
    pub trust: Option<Vec<u8>>,
    /// The alerts, and the silences.
    pub alerts: Option<Vec<u8>>,
    pub silences: Vec<crate::alert::Silence>,
    pub last_start_ms: Option<i64>,
}
const LAST_WINDOW_KEY: &[u8] = b"last_window_start_ms";

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open { path: dir.display().to_string(), source };
        // The directory's lock can outlive a closed store for a moment (sled's flusher thread,
        // or a previous process still exiting): try again for a while before giving up.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let db = loop {
            match sled::Config::new().path(dir).flush_every_ms(Some(1000)).open() {
                // sled reports the lock as `Other`, with the OS error in its message.
                Err(sled::Error::Io(e))
                    if (e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("acquire lock"))
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => break other.map_err(open_err)?,
            }
        };
        let pairs = db.open_tree("pairs").map_err(open_err)?;
        let models = db.open_tree("models").map_err(open_err)?;
        let meta = db.open_tree("meta").map_err(open_err)?;
        let outbox = db.open_tree("outbox").map_err(open_err)?;
        let dead = db.open_tree("dead_letters").map_err(open_err)?;
        let silences = db.open_tree("silences").map_err(open_err)?;
        Ok(Store { db, pairs, models, meta, outbox, dead, silences })
    }

    /// Every stored pair record. A record that does not decode is skipped with a warning
    /// (and left in place, so a newer meshwatch can still read it).
    pub fn load_pairs(&self) -> Result<Vec<v1::PairRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.pairs.iter() {
            let (key, value) = item?;
            match v1::PairRecord::decode(value.as_ref()) {
                Ok(r) => out.push(r),
                Err(error) => warn!(%error, key = ?key, "skipping an undecodable pair record"),
            }
        }
        Ok(out)
    }

    /// Writes (or overwrites) pair records in one batch.
    pub fn save_pairs(&self, records: &[v1::PairRecord]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for r in records {
            let key = r.key.as_ref().map(Message::encode_to_vec).unwrap_or_default();
            batch.insert(key, r.encode_to_vec());
        }
        self.pairs.apply_batch(batch)?;
        Ok(())
    }

    /// Forgets pairs given up at the cap: their records and models.
    pub fn remove_pairs(&self, keys: &[PairKey]) -> Result<(), StoreError> {
        let mut pairs = sled::Batch::default();
        let mut models = sled::Batch::default();
        for k in keys {
            let key = crate::pairs::key_to_proto(k).encode_to_vec();
            pairs.remove(key.clone());
            models.remove(key);
        }
        self.pairs.apply_batch(pairs)?;
        self.models.apply_batch(models)?;
        Ok(())
    }

    /// Writes a detector checkpoint: every model, then the state records (anomalies,
    /// zero-trust state, alerts), the last window scored and `queued` (notifications due at
    /// the same moment, see `enqueue`) in one transaction.
    pub fn save_checkpoint(
        &self,
        c: &crate::score::Checkpoint,
        queued: &[(String, crate::alert::Notification)],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (key, model) in &c.models {
            batch.insert(crate::pairs::key_to_proto(key).encode_to_vec(), model.as_slice());
        }
        self.models.apply_batch(batch)?;
        self.commit(&c.state, c.last_start_ms, queued)
    }

    /// Queues notifications (receiver, notification) with the state they came from, in one
    /// transaction, durably, before anything is sent: a crash at any moment leaves both or
    /// neither, so a restart re-sends at most what was queued and never starts an alert's
    /// firing cycle again.
    pub fn enqueue(
        &self,
        items: &[(String, crate::alert::Notification)],
        state: &crate::score::State,
    ) -> Result<(), StoreError> {
        self.commit(state, None, items)
    }

    fn commit(
        &self,
        state: &crate::score::State,
        last_start_ms: Option<i64>,
        queued: &[(String, crate::alert::Notification)],
    ) -> Result<(), StoreError> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let mut items = Vec::with_capacity(queued.len());
        for (receiver, n) in queued {
            let mut key = outbox_prefix(receiver);
            key.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
            items.push((key, serde_json::to_vec(n).unwrap_or_default()));
        }
        (&self.meta, &self.outbox)
            .transaction(|(meta, outbox)| {
                meta.insert(ANOMALIES_KEY, state.anomalies.as_slice())?;
                meta.insert(TRUST_KEY, state.trust.as_slice())?;
                meta.insert(ALERTS_KEY, state.alerts.as_slice())?;
                if let Some(t) = last_start_ms {
                    meta.insert(LAST_WINDOW_KEY, &t.to_be_bytes()[..])?;
                }
                for (key, value) in &items {
                    outbox.insert(key.as_slice(), value.as_slice())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Io(e),
                TransactionError::Abort(()) => StoreError::Io(sled::Error::Unsupported("aborted".into())),
            })?;
        if !items.is_empty() {
            self.db.flush()?;
        }
        Ok(())
    }

    /// The last checkpoint, with the silences.
    pub fn load_checkpoint(&self) -> Result<StoredCheckpoint, StoreError> {
        let mut models = Vec::new();
        for item in self.models.iter() {
            let (key, value) = item?;
            match v1::PairKey::decode(key.as_ref()) {
                Ok(k) => models.push((k, value.to_vec())),
                Err(error) => warn!(%error, "skipping a model with an undecodable key"),
            }
        }
        let anomalies = self.meta.get(ANOMALIES_KEY)?.map(|v| v.to_vec());
        let trust = self.meta.get(TRUST_KEY)?.map(|v| v.to_vec());
        let alerts = self.meta.get(ALERTS_KEY)?.map(|v| v.to_vec());
        let silences = self.load_silences()?;
        let last_start_ms =
            self.meta.get(LAST_WINDOW_KEY)?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map(i64::from_be_bytes);
        Ok(StoredCheckpoint { models, anomalies, trust, alerts, silences, last_start_ms })
    }

    /// Removes delivered notifications, in one batch.
    pub fn delivered(&self, keys: &[&[u8]]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(*key);
        }
        self.outbox.apply_batch(batch)?;
        self.outbox.flush()?;
        Ok(())
    }

    /// The next notifications to send to `receiver`, at most `max`: among the first `scan`
    /// queued, those whose alert has nothing queued before them (an alert's notifications go
    /// out in order, one per batch), critical ones first, each group in queue order. Beyond
    /// `scan`, the queue waits its turn.
    pub fn next_batch(&self, receiver: &str, max: usize, scan: usize) -> Result<Vec<Queued>, StoreError> {
        let mut seen = std::collections::HashSet::new();
        let (mut critical, mut rest) = (Vec::new(), Vec::new());
        for item in self.outbox.scan_prefix(outbox_prefix(receiver)).take(scan) {
            let (key, value) = item?;
            let notification: crate::alert::Notification = match serde_json::from_slice(&value) {
                Ok(n) => n,
                Err(error) => {
                    warn!(%error, receiver, "dropping an undecodable queued notification");
                    self.outbox.remove(key)?;
                    continue;
                }
            };
            if !seen.insert(notification.fingerprint.clone()) {
                continue;
            }
            let urgent = notification.labels.get("severity").is_some_and(|s| s == "critical");
            let q = Queued { key: key.to_vec(), receiver: receiver.to_string(), notification };
            if urgent {
                critical.push(q);
                if critical.len() >= max {
                    break;
                }
            } else if rest.len() < max {
                rest.push(q);
            }
        }
        critical.extend(rest);
        critical.truncate(max);
        Ok(critical)
    }

    /// Moves a notification from the outbox to the dead-letter list.
    /// Beyond `MAX_DEAD_LETTERS`, the letter of the oldest notification is dropped (logged).
    pub fn dead_letter(&self, key: &[u8], letter: &DeadLetter) -> Result<(), StoreError> {
        self.dead_letter_within(key, letter, MAX_DEAD_LETTERS)
    }

    fn dead_letter_within(&self, key: &[u8], letter: &DeadLetter, max: usize) -> Result<(), StoreError> {
        self.dead.insert(key, serde_json::to_vec(letter).unwrap_or_default())?;
        self.outbox.remove(key)?;
        // One pass: how many are kept, and which is the oldest (keys end with the
        // notification's sequence number, the same across receivers). One letter comes at a
        // time, so at most one is over.
        let seq = |k: &sled::IVec| k.get(k.len().saturating_sub(8)..).map(<[u8]>::to_vec);
        let (mut kept, mut oldest) = (0, None::<sled::IVec>);
        for k in self.dead.iter().keys() {
            let k = k?;
            kept += 1;
            if oldest.as_ref().is_none_or(|o| seq(&k) < seq(o)) {
                oldest = Some(k);
            }
        }
        if kept > max
            && let Some(oldest) = oldest
        {
            self.dead.remove(&oldest)?;
            warn!(kept = max, "dead-letter list full: the oldest dropped");
        }
        self.dead.flush()?;
        self.outbox.flush()?;
        Ok(())
    }

    /// Queued notifications of a receiver, and the creation time of the oldest.
    pub fn depth(&self, receiver: &str) -> Result<(usize, Option<i64>), StoreError> {
        let mut n = 0;
        let mut oldest = None;
        for item in self.outbox.scan_prefix(outbox_prefix(receiver)) {
            let (_, value) = item?;
            if n == 0 {
                oldest = serde_json::from_slice::<crate::alert::Notification>(&value).ok().map(|x| x.created_ms);
            }
            n += 1;
        }
        Ok((n, oldest))
    }

    /// Every dead letter, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut out: Vec<DeadLetter> =
            self.dead.iter().values().filter_map(|v| v.ok()).filter_map(|v| serde_json::from_slice(&v).ok()).collect();
        out.sort_by_key(|d| d.dead_at_ms);
        Ok(out)
    }

    /// Saves a silence, and drops the silences `purged` (ids) in the same batch.
    pub fn save_silence(&self, s: &crate::alert::Silence, purged: &[String]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for id in purged {
            batch.remove(id.as_bytes());
        }
        batch.insert(s.id.as_bytes(), serde_json::to_vec(s).unwrap_or_default());
        self.silences.apply_batch(batch)?;
        self.silences.flush()?;
        Ok(())
    }

    fn load_silences(&self) -> Result<Vec<crate::alert::Silence>, StoreError> {
        Ok(self
            .silences
            .iter()
            .values()
            .filter_map(|v| v.ok())
            .filter_map(|v| serde_json::from_slice(&v).ok())
            .collect())
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_waits_for_a_store_being_closed() {
        let dir = std::env::temp_dir().join(format!("meshwatch-store-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = Store::open(&dir).expect("open");
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        // The directory is locked for a while; the second open waits instead of failing.
        let second = Store::open(&dir).expect("opens once the first is closed");
        closer.join().expect("closer");
        drop(second);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_dead_letter_list_drops_its_oldest_beyond_its_bound() {
        let dir = std::env::temp_dir().join(format!("meshwatch-store-dead-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).expect("open");
        let n = |fingerprint: &str| crate::alert::Notification {
            fingerprint: fingerprint.into(),
            status: crate::alert::State::Firing,
            labels: Default::default(),
            annotations: Default::default(),
            starts_at_ms: 0,
            ends_at_ms: None,
            created_ms: 0,
        };
        // Queued to two receivers in turn, then given up on in that order.
        let state = crate::score::State::default();
        for (i, receiver) in ["a", "b", "a", "b", "a"].into_iter().enumerate() {
            store.enqueue(&[(receiver.to_string(), n(&i.to_string()))], &state).expect("queued");
        }
        for receiver in ["b", "a", "a", "b", "a"] {
            let q = store.next_batch(receiver, 1, usize::MAX).expect("reads").remove(0);
            let letter = DeadLetter {
                receiver: receiver.into(),
                reason: "refused".into(),
                dead_at_ms: 0,
                attempts: 1,
                notification: q.notification,
            };
            store.dead_letter_within(&q.key, &letter, 3).expect("dead-lettered");
        }
        let mut kept: Vec<String> =
            store.dead_letters().expect("reads").into_iter().map(|d| d.notification.fingerprint).collect();
        kept.sort();
        assert_eq!(kept, ["2", "3", "4"], "the three newest notifications' letters");
        assert_eq!(store.depth("a").expect("reads").0 + store.depth("b").expect("reads").0, 0);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_batch_takes_critical_notifications_first_and_one_per_alert_in_order() {
        let dir = std::env::temp_dir().join(format!("meshwatch-store-batch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).expect("open");
        let n = |fingerprint: &str, severity: &str, status: crate::alert::State| crate::alert::Notification {
            fingerprint: fingerprint.into(),
            status,
            labels: [("severity".to_string(), severity.to_string())].into_iter().collect(),
            annotations: Default::default(),
            starts_at_ms: 0,
            ends_at_ms: None,
            created_ms: 0,
        };
        use crate::alert::State::{Firing, Resolved};
        let queued = [
            n("w1", "warning", Firing),
            n("w2", "warning", Firing),
            n("w1", "warning", Resolved),
            n("c1", "critical", Firing),
            n("w3", "warning", Firing),
            n("c1", "critical", Resolved),
        ];
        let state = crate::score::State::default();
        let items: Vec<_> = queued.iter().map(|q| ("am".to_string(), q.clone())).collect();
        store.enqueue(&items, &state).expect("queued");
        let names = |b: &[Queued]| {
            b.iter()
                .map(|q| format!("{}:{}", q.notification.fingerprint, q.notification.status.as_str()))
                .collect::<Vec<_>>()
        };
        // One at a time (a webhook): the critical one goes ahead of the warnings queued before it.
        assert_eq!(names(&store.next_batch("am", 1, 1_000).expect("reads")), ["c1:firing"]);
        // A batch: critical first, then the rest in order, never an alert twice.
        let batch = store.next_batch("am", 10, 1_000).expect("reads");
        assert_eq!(names(&batch), ["c1:firing", "w1:firing", "w2:firing", "w3:firing"]);
        let keys: Vec<&[u8]> = batch.iter().map(|q| q.key.as_slice()).collect();
        store.delivered(&keys).expect("removed");
        assert_eq!(names(&store.next_batch("am", 10, 1_000).expect("reads")), ["c1:resolved", "w1:resolved"]);
        // Only the first `scan` are looked at.
        assert_eq!(names(&store.next_batch("am", 10, 1).expect("reads")), ["w1:resolved"]);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pairs_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("meshwatch-store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let record = |src: &str, last| v1::PairRecord {
            key: Some(v1::PairKey {
                source: src.into(),
                destination: "b".into(),
                direction: v1::Direction::Egress as i32,
                reporter: v1::Reporter::Source as i32,
            }),
            first_seen_ms: 1,
            last_seen_ms: last,
            total_flows: 3,
        };
        {
            let store = Store::open(&dir).expect("open");
            store.save_pairs(&[record("a", 5), record("c", 6)]).expect("save");
            store.save_pairs(&[record("a", 9)]).expect("overwrite");
            store.flush().expect("flush");
        }
        let store = Store::open(&dir).expect("reopen");
        let mut loaded = store.load_pairs().expect("load");
        loaded.sort_by_key(|r| r.last_seen_ms);
        assert_eq!(loaded, vec![record("c", 6), record("a", 9)]);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
