//! The snapshot file, `snapshot.tpsn`: the state machine's bytes at one applied index.
//!
//! Format (all integers little-endian):
//!
//! ```text
//! "TPSN" | version u32 | index u64 | term u64
//!        | conf_len u32 | conf_state[conf_len] (protobuf eraftpb::ConfState)
//!        | data_len u64 | data[data_len]       (v2: the driver's payload, see sessions::encode_payload;
//!                                               v1: StateMachine::snapshot bytes alone)
//!        | crc32c u32 over everything before it
//! ```
//!
//! Written with [`replace_file`] (tmp, fsync, rename, fsync dir), so a reader sees either the
//! previous snapshot or the new one, whole.

use std::path::Path;

use protobuf::Message as _;
use raft::eraftpb::ConfState;

use super::RaftError;
use super::durable::{io_err, replace_file};

pub(crate) const SNAPSHOT_FILE: &str = "snapshot.tpsn";
pub(crate) const SNAPSHOT_MAGIC: &[u8; 4] = b"TPSN";
/// v2 (multi-node): `data` carries the session table before the state; v1 files (the state
/// alone) are read as v2 with no sessions.
pub(crate) const SNAPSHOT_VERSION: u32 = 2;

/// A snapshot as stored on disk.
#[derive(Debug, Clone, Default)]
pub(crate) struct SnapshotFile {
    pub index: u64,
    pub term: u64,
    pub conf_state: ConfState,
    pub data: Vec<u8>,
}

impl SnapshotFile {
    /// Encodes the whole file.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, RaftError> {
        let conf =
            self.conf_state.write_to_bytes().map_err(|e| RaftError::Encode(format!("snapshot conf state: {e}")))?;
        let mut buf = Vec::with_capacity(44 + conf.len() + self.data.len());
        buf.extend_from_slice(SNAPSHOT_MAGIC);
        buf.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        buf.extend_from_slice(&self.index.to_le_bytes());
        buf.extend_from_slice(&self.term.to_le_bytes());
        // Invariant: a ConfState lists a handful of node ids, far below 4 GiB.
        let conf_len = u32::try_from(conf.len()).expect("conf state under 4 GiB");
        buf.extend_from_slice(&conf_len.to_le_bytes());
        buf.extend_from_slice(&conf);
        buf.extend_from_slice(&(self.data.len() as u64).to_le_bytes());
        buf.extend_from_slice(&self.data);
        let crc = crc32c::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        Ok(buf)
    }

    /// Decodes a whole file; `path` is only for error messages.
    pub(crate) fn decode(buf: &[u8], path: &Path) -> Result<SnapshotFile, RaftError> {
        let bad = |offset: usize, reason: &str| RaftError::CorruptLog {
            path: path.display().to_string(),
            offset: offset as u64,
            reason: reason.to_string(),
        };
        let mut r = Reader { buf, off: 0 };
        if r.take(4).ok_or_else(|| bad(0, "short snapshot header"))? != SNAPSHOT_MAGIC {
            return Err(bad(0, "bad snapshot magic"));
        }
        let found = r.u32().ok_or_else(|| bad(4, "short snapshot header"))?;
        if found != SNAPSHOT_VERSION && found != 1 {
            return Err(RaftError::UnsupportedVersion { found, supported: SNAPSHOT_VERSION });
        }
        if buf.len() < 4 {
            return Err(bad(0, "short snapshot file"));
        }
        let body_len = buf.len() - 4;
        let stored = u32::from_le_bytes([buf[body_len], buf[body_len + 1], buf[body_len + 2], buf[body_len + 3]]);
        if crc32c::crc32c(&buf[..body_len]) != stored {
            return Err(bad(body_len, "snapshot checksum mismatch"));
        }
        // The checksum matched, so a short field means a writer bug, not a torn write.
        let short = || bad(body_len, "snapshot fields overrun the file");
        let index = r.u64().ok_or_else(short)?;
        let term = r.u64().ok_or_else(short)?;
        let conf_len = r.u32().ok_or_else(short)? as usize;
        let conf = r.take(conf_len).ok_or_else(short)?;
        let conf_state = ConfState::parse_from_bytes(conf)
            .map_err(|e| bad(r.off, &format!("snapshot conf state does not decode: {e}")))?;
        let data_len = usize::try_from(r.u64().ok_or_else(short)?).map_err(|_| short())?;
        let data = r.take(data_len).ok_or_else(short)?;
        if r.off != body_len {
            return Err(bad(r.off, "snapshot length mismatch"));
        }
        let data = if found == 1 {
            super::sessions::encode_payload(&super::sessions::Sessions::default(), data).map_err(|e| bad(r.off, &e))?
        } else {
            data.to_vec()
        };
        Ok(SnapshotFile { index, term, conf_state, data })
    }
}

/// A cursor over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
    off: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.off..self.off.checked_add(n)?)?;
        self.off += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }
}

/// Reads `dir/snapshot.tpsn`, if there is one.
pub(crate) fn read(dir: &Path) -> Result<Option<SnapshotFile>, RaftError> {
    let path = dir.join(SNAPSHOT_FILE);
    match std::fs::read(&path) {
        Ok(buf) => SnapshotFile::decode(&buf, &path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Writes `dir/snapshot.tpsn` crash-safely; returns its size in bytes.
pub(crate) fn write(dir: &Path, snap: &SnapshotFile) -> Result<u64, RaftError> {
    let buf = snap.encode()?;
    replace_file(dir, SNAPSHOT_FILE, &buf)?;
    Ok(buf.len() as u64)
}
