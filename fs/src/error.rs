//! The error every front end sees: a specific cause, a small [`ErrorKind`] for protocol
//! mapping, and a POSIX errno. Front ends map in one exhaustive `match` on the kind.

use tidepool_cluster::MetaError;
use tidepool_cluster::raft::RaftError;
use tidepool_spdk::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    Exists,
    NotDir,
    IsDir,
    NotEmpty,
    NameTooLong,
    Invalid,
    NoSpace,
    /// Transient: retry.
    Unavailable,
    Corrupt,
    ReadOnly,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("block store: {0}")]
    Store(#[from] StoreError),
    #[error("meta group: {0}")]
    Raft(#[from] RaftError),
    #[error("filesystem is read-only")]
    ReadOnly,
    #[error("not a regular file ino={0}")]
    NotFile(u64),
    #[error("not a symlink ino={0}")]
    NotSymlink(u64),
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("block missing from the hot tier block_id={0}")]
    MissingBlock(u64),
    #[error(transparent)]
    Tier(#[from] crate::TierError),
    /// The cluster cannot do it now (too few nodes reachable for the replicas).
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
}

impl FsError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            FsError::Meta(e) => match e {
                MetaError::NoInode(_)
                | MetaError::NoEntry { .. }
                | MetaError::NoBlock(_)
                | MetaError::NoAccessKey(_) => ErrorKind::NotFound,
                MetaError::Exists { .. } | MetaError::AccessKeyExists(_) => ErrorKind::Exists,
                MetaError::NotDir(_) => ErrorKind::NotDir,
                MetaError::IsDir(_) => ErrorKind::IsDir,
                MetaError::NotEmpty(_) => ErrorKind::NotEmpty,
                MetaError::NameTooLong(_) => ErrorKind::NameTooLong,
                MetaError::InvalidName(_) | MetaError::Invalid(_) => ErrorKind::Invalid,
            },
            FsError::Store(e) => match e {
                StoreError::NoSpace { .. } => ErrorKind::NoSpace,
                StoreError::Checksum { .. } => ErrorKind::Corrupt,
                StoreError::NotFound(_) => ErrorKind::Corrupt,
                _ => ErrorKind::Internal,
            },
            FsError::Raft(e) => match e {
                RaftError::Stopped | RaftError::NotLeader { .. } | RaftError::Timeout { .. } => ErrorKind::Unavailable,
                _ => ErrorKind::Internal,
            },
            FsError::ReadOnly => ErrorKind::ReadOnly,
            FsError::NotFile(_) | FsError::NotSymlink(_) | FsError::Invalid(_) => ErrorKind::Invalid,
            FsError::MissingBlock(_) => ErrorKind::Corrupt,
            FsError::Unavailable(_) => ErrorKind::Unavailable,
            FsError::Tier(e) => match e {
                crate::TierError::DirtyLimit { .. } => ErrorKind::Unavailable,
                crate::TierError::Fetch { retryable: true, .. } => ErrorKind::Unavailable,
                crate::TierError::Fetch { retryable: false, .. } => ErrorKind::Internal,
                crate::TierError::Checksum { .. } => ErrorKind::Corrupt,
            },
        }
    }

    /// The POSIX errno for this error.
    pub fn errno(&self) -> i32 {
        match (self, self.kind()) {
            (FsError::NotFile(_), _) => libc::EINVAL,
            (_, ErrorKind::NotFound) => libc::ENOENT,
            (_, ErrorKind::Exists) => libc::EEXIST,
            (_, ErrorKind::NotDir) => libc::ENOTDIR,
            (_, ErrorKind::IsDir) => libc::EISDIR,
            (_, ErrorKind::NotEmpty) => libc::ENOTEMPTY,
            (_, ErrorKind::NameTooLong) => libc::ENAMETOOLONG,
            (_, ErrorKind::Invalid) => libc::EINVAL,
            (_, ErrorKind::NoSpace) => libc::ENOSPC,
            (_, ErrorKind::Unavailable) => libc::EAGAIN,
            (_, ErrorKind::Corrupt) => libc::EIO,
            (_, ErrorKind::ReadOnly) => libc::EROFS,
            (_, ErrorKind::Internal) => libc::EIO,
        }
    }
}

pub type Result<T, E = FsError> = std::result::Result<T, E>;
