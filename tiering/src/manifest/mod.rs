//! Manifests: a versioned, checksummed, compressed image of the metadata in the bucket, the
//! thing a spun-down cluster leaves behind and a new cluster starts from.
//!
//! ```text
//! manifests/<epoch:020>.tpm           the root: TPMF, version, postcard(Root), crc32c
//! manifests/<epoch:020>.tpm.p<00000>  parts: consecutive pieces of ONE zstd stream
//! manifests/LATEST                    "tidepool-manifest-latest v1\nepoch N\ncrc X\n": the commit point
//! manifests/SPIN-DOWN                 present while a spin-down is under way
//! ```
//!
//! The stream (zstd of) is a sequence of records `[len u32 LE][postcard(Record)]`: one
//! `Header`, then `Inode`, `Dir`, `Block`, `Object`, `Pin` records, and last an `End` with the
//! record count and the crc32c of every record byte before it. It is written and read as a
//! stream: a part goes up when it reaches `part_bytes` of compressed data, and a reader pulls
//! parts one after another, so millions of files never sit in one buffer. Each part's length
//! and crc32c are in the root, which is written after every part (only if absent: an epoch is
//! never overwritten), and `LATEST` is switched after the root: a crash at any moment leaves
//! `LATEST` at the previous complete manifest. A newer format version is refused with a clear
//! error; a truncated or corrupt manifest fails its checks before anything is used.

mod read;
mod write;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tidepool_cluster::meta::{BlockId, BlockMeta, Ino, Inode, ObjectId, ObjectMeta};

pub use read::{read_latest, read_manifest};
pub use write::{ManifestWriter, delete_older_than, switch_latest, write_state};

/// Format version written by this build.
pub const MANIFEST_VERSION: u16 = 1;
const ROOT_MAGIC: &[u8; 4] = b"TPMF";
const LATEST_MAGIC: &str = "tidepool-manifest-latest v1";
pub const LATEST_KEY: &str = "manifests/LATEST";
/// Present while a spin-down is under way (put at its start, deleted after `LATEST`).
pub const SPIN_DOWN_KEY: &str = "manifests/SPIN-DOWN";

/// Key of the root object of `epoch`.
pub fn root_key(epoch: u64) -> String {
    format!("manifests/{epoch:020}.tpm")
}

/// Key of part `n` of `epoch`.
pub fn part_key(epoch: u64, n: u32) -> String {
    format!("manifests/{epoch:020}.tpm.p{n:05}")
}

/// The epoch a manifest key belongs to (root or part), if it is one.
pub fn epoch_of_key(key: &str) -> Option<u64> {
    let name = key.strip_prefix("manifests/")?;
    let digits = name.get(..20)?;
    if !name[20..].starts_with(".tpm") || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("object store: {0}")]
    Object(#[from] crate::ObjectError),
    #[error("no manifest in the bucket ({0} is missing): nothing was spun down here")]
    NoLatest(String),
    #[error("manifest format version {found} is newer than this build reads (up to {supported}): upgrade tidepool")]
    NewerVersion { found: u16, supported: u16 },
    #[error("manifest is corrupt or truncated: {0}")]
    Corrupt(String),
    #[error("manifest i/o: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = ManifestError> = std::result::Result<T, E>;

/// The root object: where the parts are and what they must check to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Root {
    pub epoch: u64,
    pub created_unix_nanos: i64,
    /// (key, length, crc32c) of each part, in stream order.
    pub parts: Vec<(String, u64, u32)>,
    pub records: u64,
    /// crc32c of every record byte (uncompressed) before the End record.
    pub stream_crc: u32,
    pub summary: Summary,
}

/// What a manifest holds, for progress bars and `tidepool cost`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub file_bytes: u64,
    pub blocks: u64,
    pub block_bytes: u64,
    pub objects: u64,
    pub object_bytes: u64,
}

/// First record: the counters of the state and the settings it was written with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub epoch: u64,
    pub next_ino: Ino,
    pub next_block_id: BlockId,
    pub applied: u64,
    pub manifest_oldest_retained: u64,
    /// Settings of the cluster that wrote it (`block_size`, `pack_threshold`, ...), as text.
    pub settings: BTreeMap<String, String>,
}

/// One record of the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    Header(Header),
    /// An inode with its extents and user metadata, and its access heat (higher: read more
    /// recently; rehydration goes hottest first).
    Inode {
        inode: Inode,
        heat: u64,
    },
    /// A directory's entries, name -> child.
    Dir {
        ino: Ino,
        entries: Vec<(Vec<u8>, Ino)>,
    },
    Block {
        id: BlockId,
        meta: BlockMeta,
    },
    Object {
        id: ObjectId,
        meta: ObjectMeta,
    },
    Pin {
        ino: Ino,
    },
    End {
        records: u64,
        crc: u32,
    },
}

/// A manifest read back: the metadata image and what came with it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub root: Root,
    pub header: Header,
    pub state: tidepool_cluster::MetaState,
    /// Access heat per file.
    pub heat: BTreeMap<Ino, u64>,
}

fn encode_root(root: &Root) -> Vec<u8> {
    // Invariant: Root is plain data postcard always encodes.
    let body = postcard::to_stdvec(root).expect("postcard encodes plain data");
    let mut out = Vec::with_capacity(body.len() + 10);
    out.extend_from_slice(ROOT_MAGIC);
    out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode_root(bytes: &[u8]) -> Result<Root> {
    if bytes.len() < 10 || &bytes[..4] != ROOT_MAGIC {
        return Err(ManifestError::Corrupt("root object has no TPMF magic".into()));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version > MANIFEST_VERSION {
        return Err(ManifestError::NewerVersion { found: version, supported: MANIFEST_VERSION });
    }
    if version == 0 {
        return Err(ManifestError::Corrupt("root object version 0".into()));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let got = crc32c::crc32c(body);
    if want != got {
        return Err(ManifestError::Corrupt(format!("root checksum mismatch expected={want:#010x} actual={got:#010x}")));
    }
    postcard::from_bytes(&body[6..]).map_err(|e| ManifestError::Corrupt(format!("root undecodable: {e}")))
}

fn encode_latest(epoch: u64) -> String {
    let body = format!("{LATEST_MAGIC}\nepoch {epoch}\n");
    format!("{body}crc {:08x}\n", crc32c::crc32c(body.as_bytes()))
}

fn decode_latest(text: &str) -> Result<u64> {
    let bad = |why: &str| ManifestError::Corrupt(format!("{LATEST_KEY}: {why}"));
    let (body, crc_line) = text.rsplit_once("crc ").ok_or_else(|| bad("no crc line"))?;
    let want = u32::from_str_radix(crc_line.trim(), 16).map_err(|_| bad("bad crc line"))?;
    if crc32c::crc32c(body.as_bytes()) != want {
        return Err(bad("checksum mismatch"));
    }
    let mut lines = body.lines();
    match lines.next() {
        Some(LATEST_MAGIC) => {}
        Some(l) if l.starts_with("tidepool-manifest-latest v") => {
            return Err(ManifestError::NewerVersion { found: 0, supported: MANIFEST_VERSION });
        }
        _ => return Err(bad("not a tidepool LATEST pointer")),
    }
    let epoch = lines.next().and_then(|l| l.strip_prefix("epoch ")).ok_or_else(|| bad("no epoch line"))?;
    epoch.parse().map_err(|_| bad("bad epoch"))
}

#[cfg(test)]
mod tests;
