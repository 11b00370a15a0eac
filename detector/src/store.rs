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
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open { path: dir.display().to_string(), source };
        let db = sled::Config::new().path(dir).flush_every_ms(Some(1000)).open().map_err(open_err)?;
        let pairs = db.open_tree("pairs").map_err(open_err)?;
        Ok(Store { db, pairs })
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
