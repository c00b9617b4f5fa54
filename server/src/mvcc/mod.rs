//! Multi-version key-value state: on-disk layout, the store, and etcd's
//! request semantics.

pub mod apply;
pub mod encoding;
pub mod store;

pub use store::{Store, StoreError, WriteTxn};
