//! Multi-version key-value state: on-disk layout, the store, and etcd's
//! request semantics.

pub mod apply;
pub mod encoding;
pub mod latest;
pub mod lease;
pub mod store;

pub use lease::LeaseRecord;
pub use store::{ReadView, Store, StoreError, WriteTxn};
