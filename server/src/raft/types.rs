//! openraft type configuration and the replicated command format.
//!
//! Log entries carry batches of etcd requests encoded as protobuf
//! (`tessera.RaftBatch`) and results come back as `tessera.RaftBatchResult`,
//! so the serde layer openraft needs is just "these bytes".

use std::fmt;

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
        // A file under `member/snap` (see `raft::snapshot_files`).
        SnapshotData = tokio::fs::File,
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

/// `tessera.RaftBatch`'s `commands` field key: field 1, length-delimited.
const BATCH_COMMANDS_KEY: u8 = (1 << 3) | 2;
/// `tessera.RaftBatch`'s `proposal` field key: field 2, varint.
const BATCH_PROPOSAL_KEY: u8 = 2 << 3;

impl Command {
    pub fn encode(batch: &RaftBatch) -> Self {
        Command(batch.encode_to_vec().into())
    }

    /// The batch of `commands`, each already encoded as a
    /// `tessera.RaftCommand`, without decoding or re-encoding any of them;
    /// `proposal` (0 for none) goes first, so [`Command::proposal`] finds it
    /// without reading further. The same message [`Command::encode`] gives
    /// for their decoded batch.
    pub fn of_encoded(commands: &[Bytes], proposal: u64) -> Self {
        let len = commands
            .iter()
            .map(|c| 1 + prost::encoding::encoded_len_varint(c.len() as u64) + c.len())
            .sum::<usize>()
            + 1
            + prost::encoding::encoded_len_varint(proposal);
        let mut buf = Vec::with_capacity(len);
        if proposal != 0 {
            buf.push(BATCH_PROPOSAL_KEY);
            prost::encoding::encode_varint(proposal, &mut buf);
        }
        for c in commands {
            buf.push(BATCH_COMMANDS_KEY);
            prost::encoding::encode_varint(c.len() as u64, &mut buf);
            buf.extend_from_slice(c);
        }
        Command(buf.into())
    }

    /// The batch's proposal id, if its proposer set one.
    pub fn proposal(&self) -> Option<u64> {
        match self.0.split_first() {
            Some((&BATCH_PROPOSAL_KEY, mut rest)) => prost::encoding::decode_varint(&mut rest)
                .ok()
                .filter(|&id| id != 0),
            _ => None,
        }
    }

    /// This batch's commands, each still encoded (slices of this buffer):
    /// the inverse of [`Command::of_encoded`].
    pub fn split(&self) -> Result<Vec<Bytes>, prost::DecodeError> {
        let mut rest = self.0.clone();
        let mut commands = Vec::new();
        while !rest.is_empty() {
            if rest[0] == BATCH_PROPOSAL_KEY {
                let mut after_key = &rest[1..];
                prost::encoding::decode_varint(&mut after_key)?;
                rest = rest.slice(rest.len() - after_key.len()..);
                continue;
            }
            if rest[0] != BATCH_COMMANDS_KEY {
                return Err(prost::DecodeError::new("unexpected field in a Raft batch"));
            }
            let mut after_key = &rest[1..];
            let len = prost::encoding::decode_varint(&mut after_key)?;
            let start = rest.len() - after_key.len();
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| start.checked_add(l))
                .filter(|&end| end <= rest.len())
                .ok_or_else(|| prost::DecodeError::new("truncated Raft batch"))?;
            commands.push(rest.slice(start..end));
            rest = rest.slice(end..);
        }
        Ok(commands)
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
            proposal: 9,
        };
        let cmd = Command::encode(&batch);
        let bytes = bincode::serialize(&cmd).unwrap();
        let back: Command = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back, cmd);
        assert_eq!(back.decode().unwrap(), batch);
    }

    #[test]
    fn encoded_commands_make_the_same_batch() {
        let commands: Vec<RaftCommand> = (0..300u32)
            .map(|i| RaftCommand {
                request: Some(Request::Put(PutRequest {
                    key: i.to_be_bytes().to_vec(),
                    value: vec![7; i as usize],
                    ..Default::default()
                })),
                auth: None,
            })
            .collect();
        let encoded: Vec<Bytes> = commands.iter().map(|c| c.encode_to_vec().into()).collect();
        let batch = Command::of_encoded(&encoded, 0);
        assert_eq!(
            batch,
            Command::encode(&RaftBatch {
                commands: commands.clone(),
                proposal: 0
            })
        );
        assert_eq!(batch.split().unwrap(), encoded);
        assert_eq!(batch.proposal(), None);
        assert_eq!(
            Command::of_encoded(&[], 0).split().unwrap(),
            Vec::<Bytes>::new()
        );
        // With a proposal id: found first, skipped by split, and the same
        // message for a decoder.
        let batch = Command::of_encoded(&encoded, u64::MAX - 5);
        assert_eq!(batch.proposal(), Some(u64::MAX - 5));
        assert_eq!(batch.split().unwrap(), encoded);
        assert_eq!(
            batch.decode().unwrap(),
            RaftBatch {
                commands,
                proposal: u64::MAX - 5
            }
        );
    }

    #[test]
    fn malformed_batches_are_refused() {
        let batch = Command::of_encoded(&[Bytes::from_static(b"abcdef")], 0);
        let truncated = Command(batch.0.slice(..batch.0.len() - 1));
        assert!(truncated.split().is_err());
        assert!(Command(Bytes::from_static(&[0x12, 0])).split().is_err());
        assert!(Command(Bytes::from_static(&[BATCH_COMMANDS_KEY, 0xff]))
            .split()
            .is_err());
    }
}
