//! openraft type configuration and the replicated command format.
//!
//! Log entries carry batches of etcd requests encoded as protobuf
//! (`tessera.RaftBatch`) and results come back as `tessera.RaftBatchResult`,
//! so the serde layer openraft needs is just "these bytes".

use std::fmt;
use std::io::Cursor;

use bytes::Bytes;
use prost::Message;
use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use tessera_proto::tessera::{RaftBatch, RaftBatchResult};

openraft::declare_raft_types!(
    /// Tessera's Raft types: u64 member ids, etcd requests as log payload.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;

/// Replicated requests: a batch proposed together (see
/// [`crate::proposals`]), kept encoded as `tessera.RaftBatch`. openraft
/// clones entries between the log, the replication streams and the network;
/// encoded, each clone shares one buffer, and the batch is decoded once, when
/// it is applied.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Command(pub Bytes);

impl Command {
    pub fn encode(batch: &RaftBatch) -> Self {
        Command(batch.encode_to_vec().into())
    }

    pub fn decode(&self) -> Result<RaftBatch, prost::DecodeError> {
        RaftBatch::decode(self.0.clone())
    }
}

impl Serialize for Command {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Command(d.deserialize_bytes(BytesVisitor)?.into()))
    }
}

/// What applying a [`Command`] produced: one result per request.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct CommandResult(pub RaftBatchResult);

macro_rules! serde_as_protobuf {
    ($wrapper:ident, $inner:ty) => {
        impl Serialize for $wrapper {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0.encode_to_vec())
            }
        }

        impl<'de> Deserialize<'de> for $wrapper {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let bytes = d.deserialize_bytes(BytesVisitor)?;
                <$inner>::decode(bytes.as_slice())
                    .map($wrapper)
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_as_protobuf!(CommandResult, RaftBatchResult);

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("protobuf bytes")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(b) = seq.next_element()? {
            out.push(b);
        }
        Ok(out)
    }
}

/// Shorthand for an openraft storage I/O error.
pub fn storage_io_error(verb_read: bool, e: impl std::error::Error + 'static) -> StorageError {
    let any = openraft::AnyError::new(&e);
    if verb_read {
        openraft::StorageIOError::read(any).into()
    } else {
        openraft::StorageIOError::write(any).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::etcdserverpb::PutRequest;
    use tessera_proto::tessera::raft_command::Request;
    use tessera_proto::tessera::RaftCommand;

    #[test]
    fn command_survives_bincode() {
        let put = |key: &[u8]| RaftCommand {
            request: Some(Request::Put(PutRequest {
                key: key.to_vec(),
                value: vec![0, 1, 2, 255],
                ..Default::default()
            })),
            auth: None,
        };
        let batch = RaftBatch {
            commands: vec![put(b"k"), put(b"l")],
        };
        let cmd = Command::encode(&batch);
        let bytes = bincode::serialize(&cmd).unwrap();
        let back: Command = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back, cmd);
        assert_eq!(back.decode().unwrap(), batch);
    }
}
