//! The store's errors as the gRPC codes the CSI spec names for each case.

use tessera_store::cli::NoRoom;
use tessera_store::meta::MetaError;
use tessera_store::placement::PlacementError;
use tonic::{Code, Status};

/// Maps an error from the store's operations to a status: the typed
/// errors of the control plane and placement by kind, anything else as
/// `Internal`. The message is the whole error chain, for the operator.
pub fn from_store(e: anyhow::Error) -> Status {
    let message = format!("{e:#}");
    let code = e
        .chain()
        .find_map(|cause| {
            if let Some(m) = cause.downcast_ref::<MetaError>() {
                return Some(match m {
                    MetaError::Etcd { .. } => Code::Unavailable,
                    MetaError::NoSuchVolume(_) | MetaError::NoSuchSnapshot(_) => Code::NotFound,
                    MetaError::VolumeExists(_) | MetaError::SnapshotExists(_) => {
                        Code::AlreadyExists
                    }
                    MetaError::Attached { .. } => Code::FailedPrecondition,
                    MetaError::Conflict(_) => Code::Aborted,
                    MetaError::Malformed { .. } | MetaError::NodeRunning { .. } => Code::Internal,
                });
            }
            if cause.downcast_ref::<PlacementError>().is_some()
                || cause.downcast_ref::<NoRoom>().is_some()
            {
                return Some(Code::ResourceExhausted);
            }
            None
        })
        .unwrap_or(Code::Internal);
    Status::new(code, message)
}

/// `InvalidArgument` for a missing field.
pub fn required(call: &str, field: &str) -> Status {
    Status::invalid_argument(format!("{call}: {field} is required"))
}
