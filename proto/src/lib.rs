//! meshwatch's own protobuf messages, generated from `meshwatch/v1/*.proto` at build time.
//!
//! `store.proto` holds the records persisted in the sled store. Envoy's own messages come
//! from the `envoy-types` crate, not from here.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/meshwatch.v1.rs"));
}
