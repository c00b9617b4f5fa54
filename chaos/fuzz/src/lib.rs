//! The server's request checks, compiled in from `server/src` so the fuzz
//! build needs neither RocksDB nor the rest of the server: the same source
//! files, not copies.

#[path = "../../../server/src/errors.rs"]
pub mod errors;

#[path = "../../../server/src/validate.rs"]
pub mod validate;

/// The auth module's permission intervals (the file only needs the protos).
#[path = "../../../server/src/auth/perms.rs"]
pub mod perms;
