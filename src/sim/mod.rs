//! Simulated Envoy traffic: scenario files (`scenario`), a deterministic generator of the
//! access logs a mesh would send (`generate`, drawing from `random`, writing entries with
//! `envoy`), and the player that streams them to meshwatch over gRPC (`play`).

pub mod envoy;
pub mod generate;
pub mod play;
pub mod random;
pub mod scenario;
