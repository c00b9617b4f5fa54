//! `tessera-csi`: the CSI plugin that presents Tessera volumes to pods.
//!
//! Empty for now; it builds on the control plane and the storage nodes.
