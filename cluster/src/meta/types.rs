//! Types of the metadata state machine: what is stored, what is proposed, what comes back.
//! Everything here is serialised with postcard into the Raft log and snapshots, so a change
//! to a type is a format change (bump `meta::SNAPSHOT_VERSION` and migrate).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub type Ino = u64;
pub type BlockId = u64;
/// Nanoseconds since the Unix epoch. Commands carry their time so that apply stays pure.
pub type Nanos = i64;

pub const ROOT_INO: Ino = 1;
/// Longest name of a directory entry, in bytes (NAME_MAX).
pub const NAME_MAX: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InodeKind {
    File,
    Dir,
    Symlink,
}

/// The attributes every front end shows (stat).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: Ino,
    /// Raft index of the create: with `ino` it names this inode forever (NFS file handles).
    pub generation: u64,
    pub kind: InodeKind,
    /// Permission bits only (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// File: logical size in bytes. Dir: number of entries. Symlink: target length.
    pub size: u64,
    /// Dir: 2 + number of subdirectories. File, symlink: 1.
    pub nlink: u32,
    /// Directory holding this inode's one entry (the root is its own parent).
    pub parent: Ino,
    pub atime: Nanos,
    pub mtime: Nanos,
    pub ctime: Nanos,
}

/// A piece of a file: `len` bytes at the key's file offset are bytes
/// `block_offset..block_offset + len` of block `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub len: u64,
    pub block: BlockId,
    pub block_offset: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub attr: Attr,
    /// User metadata: S3 `x-amz-meta-*` and the same map through every front end.
    pub xattrs: BTreeMap<String, String>,
    /// File only: extents keyed by file offset; non-overlapping; holes read as zeros.
    pub extents: BTreeMap<u64, Extent>,
    /// Symlink only: the target.
    pub target: Vec<u8>,
}

/// Names an object in the bucket: a random 128-bit id chosen by the uploader (so a crash
/// mid-upload leaves only an unreferenced object for GC, never a clash). The key is derived
/// from the id and the kind (`tidepool_tiering::format`).
pub type ObjectId = u128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectKind {
    /// Consecutive blocks of one large file.
    Chunk,
    /// Blocks of many small files, with a footer index.
    Pack,
}

/// Where a tiered block's bytes are in the object store: bytes `offset..offset + len` of
/// object `object`, whose crc32c is `crc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectLocator {
    pub object: ObjectId,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

/// The replicated state of a block. Whether a tiered block also has a copy on this node's
/// NVMe (clean) or not (cold) is node-local: the block store's index says, not the meta group
/// (so eviction and read-through caching cost no consensus round).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockState {
    /// On NVMe only; never evicted.
    Dirty,
    /// In the object store at this locator (and maybe still on NVMe: clean; or not: cold).
    Tiered(ObjectLocator),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMeta {
    pub len: u32,
    pub state: BlockState,
    /// Number of extents (over all files) that point at this block. A block whose count
    /// drops to zero leaves the table and is returned in `Applied::freed`.
    pub refs: u32,
    /// When the block was laid into a file (the command's time): `tier_after` counts from it.
    pub written: Nanos,
}

/// An object in the bucket that tiered blocks point into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub kind: ObjectKind,
    /// Whole object, footer included: what the bucket bills.
    pub size_bytes: u64,
    /// Bytes of the blocks that still point into it.
    pub live_bytes: u64,
    /// Number of blocks that still point into it; at zero the object is garbage.
    pub live_blocks: u32,
    pub created: Nanos,
    /// The newest manifest (epoch) written while this object was in the table: a manifest may
    /// point into it, so GC keeps it while that manifest is retained. `None`: in no manifest.
    pub kept_epoch: Option<u64>,
}

/// A block as uploaded into an object (`Command::RecordTiered`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TieredBlock {
    pub id: BlockId,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NewKind {
    File,
    Dir,
    Symlink { target: Vec<u8> },
}

/// A block just written to the block store, to be laid into a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewBlock {
    pub id: BlockId,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create an entry; `Exists` if the name is taken.
    Create {
        parent: Ino,
        name: Vec<u8>,
        kind: NewKind,
        mode: u32,
        uid: u32,
        gid: u32,
        now: Nanos,
    },
    /// Change attributes; `size` truncates or extends (with a hole).
    SetAttr {
        ino: Ino,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<Nanos>,
        mtime: Option<Nanos>,
        now: Nanos,
    },
    /// Lay `blocks` (already in the block store) end to end at `offset` of file `ino`,
    /// replacing what was there (copy-on-write). Size grows to cover them.
    Write {
        ino: Ino,
        offset: u64,
        blocks: Vec<NewBlock>,
        now: Nanos,
    },
    /// Rename, replacing an existing destination of a compatible kind (POSIX rename).
    Rename {
        src_parent: Ino,
        src_name: Vec<u8>,
        dst_parent: Ino,
        dst_name: Vec<u8>,
        now: Nanos,
    },
    /// Remove a file or symlink entry.
    Unlink {
        parent: Ino,
        name: Vec<u8>,
        now: Nanos,
    },
    /// Remove an empty directory.
    Rmdir {
        parent: Ino,
        name: Vec<u8>,
        now: Nanos,
    },
    SetXattr {
        ino: Ino,
        key: String,
        value: String,
        now: Nanos,
    },
    RemoveXattr {
        ino: Ino,
        key: String,
        now: Nanos,
    },
    /// Replace the whole user-metadata map (S3 PUT / COPY with REPLACE).
    ReplaceXattrs {
        ino: Ino,
        xattrs: BTreeMap<String, String>,
        now: Nanos,
    },
    /// Hand out `count` fresh block ids (a range, so writers need no round trip per block).
    AllocBlockIds {
        count: u64,
    },
    /// Tiering: `object` (already written to the bucket) holds `blocks`. Each block still in
    /// the table with that length becomes `Tiered` at its place in the object if it is `Dirty`
    /// (`from: None`: a first upload) or tiered in object `from` (a GC rewrite); other blocks
    /// (freed or moved meanwhile) are skipped. The object enters the table with the live
    /// bytes of the blocks that took, possibly none (then GC deletes it). An object id already
    /// in the table is `Invalid`. (This variant took the slot of `SetBlockState`, which no
    /// release ever proposed.)
    RecordTiered {
        object: ObjectId,
        kind: ObjectKind,
        size_bytes: u64,
        blocks: Vec<TieredBlock>,
        from: Option<ObjectId>,
        now: Nanos,
    },
    /// Append the contents of each file of `srcs`, in order, at the end of file `dst` (holes
    /// kept), then remove the sources' entries. Extents move (shifted), blocks are not copied
    /// and their reference counts do not change: S3 CompleteMultipartUpload joins its parts so.
    /// `srcs` are distinct files, none is `dst`; at least one.
    Concat {
        dst: Ino,
        srcs: Vec<Ino>,
        now: Nanos,
    },
    /// Add an S3 access key; `AccessKeyExists` if the id is taken. The secret arrives sealed
    /// (encrypted outside the state machine); apply only checks the shape.
    PutAccessKey {
        id: String,
        key: AccessKey,
    },
    /// Revoke an S3 access key; `NoAccessKey` if there is none with that id.
    DeleteAccessKey {
        id: String,
    },
    /// Create or replace the file `name` of dir `parent` with exactly `blocks` (already in the
    /// block store) laid end to end from offset 0 (size: their total; none: an empty file) and
    /// exactly `xattrs` as its user metadata, in one step (S3 PutObject / CopyObject). An
    /// existing file is replaced as by a rename over it: its inode and blocks go (`freed`),
    /// the new inode has a new ino and generation. A dir there is `IsDir`, a symlink `Invalid`.
    Publish {
        parent: Ino,
        name: Vec<u8>,
        blocks: Vec<NewBlock>,
        xattrs: BTreeMap<String, String>,
        mode: u32,
        uid: u32,
        gid: u32,
        now: Nanos,
    },
    /// GC: forget objects already deleted from the bucket. Each must be in the table with no
    /// live block (else `Invalid`); ids not in the table are skipped (a retried drop).
    DropObjects {
        objects: Vec<ObjectId>,
    },
    /// Pin (or unpin) an inode: blocks of files at or below a pinned inode are never evicted
    /// and are rehydrated first.
    SetPin {
        ino: Ino,
        pinned: bool,
    },
    /// A manifest of epoch `epoch` is being written and points into `objects`: they are kept
    /// from GC (`kept_epoch = epoch`) while manifests of epoch `oldest_retained` or newer are
    /// retained. `epoch` must be above every earlier one. (The writer cuts the manifest from a
    /// state a little older than this command and holds GC off in between, so every object it
    /// names is still in the table.)
    KeepObjects {
        epoch: u64,
        oldest_retained: u64,
        objects: Vec<ObjectId>,
    },
    /// A cluster node's addresses (joining, or announcing them at start): set or replaced.
    SetNode {
        id: u64,
        info: NodeInfo,
    },
    /// A node left the cluster (`tidepool node remove`). Absent is fine.
    DropNode {
        id: u64,
    },
    /// Spin-down: every node refuses writes while `frozen` (the flag is replicated, so a
    /// write through any node is refused, not only through the node running the spin-down).
    SetFrozen {
        frozen: bool,
    },
}

/// A member of the cluster as the meta group records it: where its transport, front ends and
/// status endpoint listen. Raft's own membership (voters) is kept by the Raft layer; this is
/// what the other nodes need to reach it. Snapshot version 4 on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node-to-node transport (`cluster_advertise`).
    pub addr: String,
    pub s3: String,
    pub nfs: String,
    pub http: String,
    /// When it was first recorded.
    pub joined: Nanos,
}

/// An S3 access key as the meta group keeps it: only what is needed to verify a signature.
/// SigV4 needs the secret itself on the server, so it is kept sealed (AES-256-GCM under the
/// node key, `nonce || ciphertext+tag`); the state machine never sees it in the clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKey {
    pub secret_sealed: Vec<u8>,
    pub created: Nanos,
    /// Optional label (`tidepool keys create --name`).
    pub name: String,
}

/// What a successful apply returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The inode created or changed (Create, Publish, SetAttr, Write, xattr commands, Rename: the moved inode).
    pub attr: Option<Attr>,
    /// Blocks no extent points at any more: the caller frees them in the block store.
    pub freed: Vec<BlockId>,
    /// AllocBlockIds: the first id of the range.
    pub first_block_id: Option<BlockId>,
    /// RecordTiered: how many of the listed blocks now point into the object.
    pub tiered: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("no such inode ino={0}")]
    NoInode(Ino),
    #[error("no such entry name={name:?} parent={parent}")]
    NoEntry { parent: Ino, name: String },
    #[error("entry exists name={name:?} parent={parent}")]
    Exists { parent: Ino, name: String },
    #[error("not a directory ino={0}")]
    NotDir(Ino),
    #[error("is a directory ino={0}")]
    IsDir(Ino),
    #[error("directory not empty ino={0}")]
    NotEmpty(Ino),
    #[error("name too long len={0} max=255")]
    NameTooLong(usize),
    #[error("invalid name name={0:?}")]
    InvalidName(String),
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("no such block block_id={0}")]
    NoBlock(BlockId),
    #[error("no such access key access_key_id={0}")]
    NoAccessKey(String),
    #[error("access key exists access_key_id={0}")]
    AccessKeyExists(String),
}
