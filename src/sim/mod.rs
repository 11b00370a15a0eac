//! Simulated Envoy traffic: access-log entries as Envoy fills them (`envoy`).

pub mod envoy;
