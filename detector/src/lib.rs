//! The detector: per-pair state, persistence, and everything meshwatch shows the world.
//!
//! `run` consumes the closed windows the collector produces and folds them into the
//! `pairs` table, persisting each touched pair in the sled `store` so that nothing learnt is
//! lost on restart. `http` serves `/metrics` (the pair table is exposed through
//! `pairs::PairCollector`), health endpoints and the JSON API.

pub mod baseline;
pub mod http;
pub mod model;
pub mod pairs;
pub mod stats;
pub mod store;

use std::sync::Arc;

use meshwatch_collector::window::ClosedWindow;
use tokio::sync::mpsc;
use tracing::{debug, error};

use crate::pairs::PairTable;
use crate::store::Store;

/// Runs until the collector closes `windows`, then flushes the store.
pub async fn run(mut windows: mpsc::Receiver<ClosedWindow>, table: Arc<PairTable>, store: Store) {
    while let Some(window) = windows.recv().await {
        let changed = table.apply(&window);
        if changed.is_empty() {
            continue;
        }
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.save_pairs(&changed)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "cannot persist pairs"),
            Err(e) => error!(error = %e, "pair persistence task failed"),
        }
    }
    match tokio::task::spawn_blocking(move || store.flush()).await {
        Ok(Ok(())) => debug!("store flushed"),
        Ok(Err(e)) => error!(error = %e, "cannot flush the store"),
        Err(e) => error!(error = %e, "store flush task failed"),
    }
}
