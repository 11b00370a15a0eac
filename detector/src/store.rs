//! The embedded store (sled): what must survive a restart.
//!
//! Every value is a `meshwatch.v1` protobuf message. Calls block on disk I/O: the async side
//! runs them under `spawn_blocking`.

use std::path::Path;

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
    pub last_start_ms: Option<i64>,
}
const LAST_WINDOW_KEY: &[u8] = b"last_window_start_ms";

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open { path: dir.display().to_string(), source };
        let db = sled::Config::new().path(dir).flush_every_ms(Some(1000)).open().map_err(open_err)?;
        let pairs = db.open_tree("pairs").map_err(open_err)?;
        let models = db.open_tree("models").map_err(open_err)?;
        let meta = db.open_tree("meta").map_err(open_err)?;
        Ok(Store { db, pairs, models, meta })
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

    /// Writes a detector checkpoint: every model, the anomalies, the zero-trust state, the
    /// last window scored.
    pub fn save_checkpoint(&self, c: &crate::score::Checkpoint) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (key, model) in &c.models {
            batch.insert(crate::pairs::key_to_proto(key).encode_to_vec(), model.as_slice());
        }
        self.models.apply_batch(batch)?;
        self.meta.insert(ANOMALIES_KEY, c.anomalies.as_slice())?;
        self.meta.insert(TRUST_KEY, c.trust.as_slice())?;
        if let Some(t) = c.last_start_ms {
            self.meta.insert(LAST_WINDOW_KEY, &t.to_be_bytes())?;
        }
        Ok(())
    }

    /// The last checkpoint.
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
        let last_start_ms =
            self.meta.get(LAST_WINDOW_KEY)?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map(i64::from_be_bytes);
        Ok(StoredCheckpoint { models, anomalies, trust, last_start_ms })
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
