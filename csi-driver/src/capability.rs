//! Which volume capabilities the plugin serves: block or filesystem
//! (ext4, xfs) access by one node, read-write or read-only. A volume has
//! one writer at a time (its epoch fences any other), so multi-node modes
//! are refused.

use tessera_proto::csi::volume_capability::access_mode::Mode;
use tessera_proto::csi::volume_capability::AccessType;
use tessera_proto::csi::VolumeCapability;

/// Filesystems the node formats and mounts.
pub const FILESYSTEMS: [&str; 2] = ["ext4", "xfs"];
/// The filesystem when neither the request nor the StorageClass names one.
pub const DEFAULT_FILESYSTEM: &str = "ext4";

/// How a volume is presented.
#[derive(Debug, Clone, PartialEq)]
pub enum Access {
    Block,
    Mount {
        /// Empty: the StorageClass's, or [`DEFAULT_FILESYSTEM`].
        fs_type: String,
        flags: Vec<String>,
    },
}

/// Checks one capability; the error says why it is not served.
pub fn check(capability: &VolumeCapability) -> Result<Access, String> {
    let mode = capability
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .ok_or("the volume capability has no access mode")?;
    match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeReaderOnly => {}
        Mode::Unknown => return Err("the access mode is UNKNOWN".into()),
        other => {
            return Err(format!(
                "access mode {} is not supported: a Tessera volume is used by one node at a time",
                other.as_str_name()
            ))
        }
    }
    match &capability.access_type {
        Some(AccessType::Block(_)) => Ok(Access::Block),
        Some(AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() && !FILESYSTEMS.contains(&m.fs_type.as_str()) {
                return Err(format!(
                    "filesystem {:?} is not supported (use one of {})",
                    m.fs_type,
                    FILESYSTEMS.join(", ")
                ));
            }
            if !m.volume_mount_group.is_empty() {
                return Err("volume_mount_group is not supported".into());
            }
            Ok(Access::Mount {
                fs_type: m.fs_type.clone(),
                flags: m.mount_flags.clone(),
            })
        }
        None => Err("the volume capability has neither block nor mount access".into()),
    }
}

/// Checks every capability of a request; an empty list is an error too.
pub fn check_all(capabilities: &[VolumeCapability]) -> Result<Vec<Access>, String> {
    if capabilities.is_empty() {
        return Err("volume capabilities are required".into());
    }
    capabilities.iter().map(check).collect()
}

/// Whether the capability is read-only by its access mode.
pub fn read_only(capability: &VolumeCapability) -> bool {
    capability
        .access_mode
        .as_ref()
        .is_some_and(|m| m.mode() == Mode::SingleNodeReaderOnly)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(mode: Mode, access: AccessType) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(access),
        }
    }

    fn mount(fs: &str) -> AccessType {
        AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })
    }

    #[test]
    fn single_node_block_and_filesystems_are_served() {
        assert_eq!(
            check(&cap(
                Mode::SingleNodeWriter,
                AccessType::Block(BlockVolume {})
            )),
            Ok(Access::Block)
        );
        for fs in ["", "ext4", "xfs"] {
            assert!(check(&cap(Mode::SingleNodeSingleWriter, mount(fs))).is_ok());
        }
        assert!(read_only(&cap(Mode::SingleNodeReaderOnly, mount("xfs"))));
    }

    #[test]
    fn multi_node_modes_unknown_filesystems_and_empty_capabilities_are_refused() {
        for mode in [
            Mode::MultiNodeMultiWriter,
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::Unknown,
        ] {
            assert!(check(&cap(mode, mount("ext4"))).is_err(), "{mode:?}");
        }
        assert!(check(&cap(Mode::SingleNodeWriter, mount("btrfs"))).is_err());
        assert!(check(&VolumeCapability::default()).is_err());
        assert!(check_all(&[]).is_err());
    }
}
