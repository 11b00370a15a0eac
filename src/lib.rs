//! meshwatch: learns what normal Envoy traffic looks like for every pair of services and
//! flags what is not.
//!
//! This crate is the wiring behind the `meshwatch` binary: `config` reads and validates the
//! configuration, `serve` runs the collector and the detector in one process, `sim` plays
//! simulated meshes into it, `eval` measures what it detects, and `univariate` runs the
//! detector's models over one series (`meshwatch score`). The work itself lives in the
//! `meshwatch-collector` and `meshwatch-detector` crates.

pub mod backtest;
pub mod config;
pub mod eval;
pub mod listen;
pub mod serve;
pub mod sim;
pub mod telemetry;
pub mod tls;
pub mod univariate;
