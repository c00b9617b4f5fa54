//! etcd's client-visible errors, byte for byte.
//!
//! Clients (clientv3, etcdctl, kube-apiserver) match on the gRPC code *and* the
//! message text, so both are copied from etcd's `rpctypes` table. Errors that
//! the state machine produces are carried through the Raft log result as a
//! stable numeric code ([`EtcdError::code_number`]), never as text.

use tonic::{Code, Status};

/// An error with etcd's exact gRPC status code and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: not leader")]
    NotLeader,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: request timed out, possibly due to previous leader failure")]
    TimeoutDueToLeaderFail,
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: member ID already exist")]
    MemberExists,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    #[error("etcdserver: given member URLs are invalid")]
    MemberBadUrls,
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    #[error("etcdserver: request timed out, leader transfer took too long")]
    LeadershipTransferTimeout,
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    #[error("auth: authentication failed, password was given for no password user")]
    NoPasswordUser,
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    #[error("auth: token signing attempted with verify-only key")]
    VerifyOnly,
    /// Tessera's own: a committed command that could not be decoded when
    /// applied, and was skipped on every member (a bug, never an etcd
    /// answer; validation refuses what would cause it).
    #[error("tessera: the request could not be decoded when it was applied and was skipped")]
    Undecodable,
}

impl EtcdError {
    /// The gRPC status code etcd answers this error with.
    pub fn grpc_code(self) -> Code {
        use EtcdError::*;
        match self {
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey
            | RequestTooLarge | MemberBadUrls => Code::InvalidArgument,
            Compacted | FutureRev | LeaseTtlTooLarge => Code::OutOfRange,
            NoSpace => Code::ResourceExhausted,
            LeaseNotFound | MemberNotFound => Code::NotFound,
            NotLeader | LeaseExists | MemberExists | PeerUrlExists | MemberNotLearner
            | LearnerNotReady | BadLeaderTransferee => Code::FailedPrecondition,
            NoLeader | Timeout | TimeoutDueToLeaderFail | Stopped | LeadershipTransferTimeout => {
                Code::Unavailable
            }
            Corrupt => Code::DataLoss,
            UserEmpty | RoleEmpty | AuthFailed | InvalidAuthMgmt | AuthOldRevision => {
                Code::InvalidArgument
            }
            RootUserNotExist | RootRoleNotExist | UserAlreadyExist | UserNotFound
            | RoleAlreadyExist | RoleNotFound | RoleNotGranted | PermissionNotGranted
            | AuthNotEnabled => Code::FailedPrecondition,
            PermissionDenied => Code::PermissionDenied,
            InvalidAuthToken => Code::Unauthenticated,
            NoPasswordUser | VerifyOnly => Code::Unknown,
            PermissionNotGiven => Code::InvalidArgument,
            Undecodable => Code::Internal,
        }
    }

    /// The auth package's own text for an auth error, which etcd answers
    /// (with code Unknown) where it returns the error without translating it
    /// (the maintenance RPCs' admin check).
    pub fn untranslated(self) -> Status {
        use EtcdError::*;
        let text = match self {
            UserEmpty => "auth: user name is empty",
            UserNotFound => "auth: user not found",
            PermissionDenied => "auth: permission denied",
            InvalidAuthToken => "auth: invalid auth token",
            other => return other.into(),
        };
        Status::unknown(text)
    }

    /// The message text, as clients match on it.
    pub fn message(self) -> String {
        self.to_string()
    }

    /// Stable number used to carry the error through a Raft apply result.
    /// Never renumber: results are stored in the replicated log's responses.
    pub fn code_number(self) -> u32 {
        use EtcdError::*;
        match self {
            EmptyKey => 1,
            KeyNotFound => 2,
            ValueProvided => 3,
            LeaseProvided => 4,
            TooManyOps => 5,
            DuplicateKey => 6,
            Compacted => 7,
            FutureRev => 8,
            NoSpace => 9,
            LeaseNotFound => 10,
            RequestTooLarge => 11,
            NoLeader => 12,
            NotLeader => 13,
            Timeout => 14,
            Stopped => 15,
            Corrupt => 16,
            MemberNotFound => 17,
            LeaseExists => 18,
            LeaseTtlTooLarge => 19,
            MemberExists => 20,
            PeerUrlExists => 21,
            MemberBadUrls => 22,
            MemberNotLearner => 23,
            LearnerNotReady => 24,
            BadLeaderTransferee => 25,
            LeadershipTransferTimeout => 26,
            RootUserNotExist => 27,
            RootRoleNotExist => 28,
            UserAlreadyExist => 29,
            UserEmpty => 30,
            UserNotFound => 31,
            RoleAlreadyExist => 32,
            RoleNotFound => 33,
            RoleEmpty => 34,
            AuthFailed => 35,
            PermissionDenied => 36,
            RoleNotGranted => 37,
            PermissionNotGranted => 38,
            AuthNotEnabled => 39,
            InvalidAuthToken => 40,
            InvalidAuthMgmt => 41,
            AuthOldRevision => 42,
            NoPasswordUser => 43,
            PermissionNotGiven => 44,
            VerifyOnly => 45,
            Undecodable => 46,
            TimeoutDueToLeaderFail => 47,
        }
    }

    /// Inverse of [`EtcdError::code_number`]; unknown numbers are `None`.
    pub fn from_code_number(n: u32) -> Option<Self> {
        use EtcdError::*;
        const ALL: [EtcdError; 47] = [
            EmptyKey,
            KeyNotFound,
            ValueProvided,
            LeaseProvided,
            TooManyOps,
            DuplicateKey,
            Compacted,
            FutureRev,
            NoSpace,
            LeaseNotFound,
            RequestTooLarge,
            NoLeader,
            NotLeader,
            Timeout,
            Stopped,
            Corrupt,
            MemberNotFound,
            LeaseExists,
            LeaseTtlTooLarge,
            MemberExists,
            PeerUrlExists,
            MemberBadUrls,
            MemberNotLearner,
            LearnerNotReady,
            BadLeaderTransferee,
            LeadershipTransferTimeout,
            RootUserNotExist,
            RootRoleNotExist,
            UserAlreadyExist,
            UserEmpty,
            UserNotFound,
            RoleAlreadyExist,
            RoleNotFound,
            RoleEmpty,
            AuthFailed,
            PermissionDenied,
            RoleNotGranted,
            PermissionNotGranted,
            AuthNotEnabled,
            InvalidAuthToken,
            InvalidAuthMgmt,
            AuthOldRevision,
            NoPasswordUser,
            PermissionNotGiven,
            VerifyOnly,
            Undecodable,
            TimeoutDueToLeaderFail,
        ];
        ALL.into_iter().find(|e| e.code_number() == n)
    }
}

impl From<EtcdError> for Status {
    fn from(e: EtcdError) -> Status {
        Status::new(e.grpc_code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_numbers_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..64 {
            if let Some(e) = EtcdError::from_code_number(n) {
                assert_eq!(e.code_number(), n);
                assert!(seen.insert(n));
            }
        }
        assert_eq!(seen.len(), 47);
        assert_eq!(EtcdError::from_code_number(0), None);
    }

    #[test]
    fn status_carries_etcd_text() {
        let s: Status = EtcdError::Compacted.into();
        assert_eq!(s.code(), Code::OutOfRange);
        assert_eq!(
            s.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
    }
}
