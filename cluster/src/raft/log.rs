//! The durable Raft log: one append-only file, `raft.log`, holding entries and hard states.
//!
//! Format (all integers little-endian):
//!
//! ```text
//! header:  "TPRL" | version u32
//! record:  len u32 | crc32c u32 | kind u8 | payload[len]
//!          crc32c covers kind and payload
//!          kind 1 = Entry     (payload: protobuf eraftpb::Entry)
//!          kind 2 = HardState (payload: protobuf eraftpb::HardState)
//! ```
//!
//! Replay rules: an entry whose index is <= that of an earlier one replaces it and drops the
//! suffix after it (a new leader overwrote an uncommitted tail); entries covered by the
//! snapshot are skipped; the last hard state wins. A bad record with nothing valid after it
//! is a torn tail (a write cut short by a crash, never acknowledged) and is truncated away;
//! a bad record followed by a valid one is [`RaftError::CorruptLog`]: acknowledged data is
//! never dropped silently.
//!
//! After a snapshot the log is compacted by writing a new file (hard state + entries after
//! the snapshot) and renaming it over the old one; see [`LogFile::rewrite`].

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState};

use super::RaftError;
use super::durable::{io_err, replace_file};

pub(crate) const LOG_FILE: &str = "raft.log";
pub(crate) const LOG_MAGIC: &[u8; 4] = b"TPRL";
pub(crate) const LOG_VERSION: u32 = 1;
pub(crate) const HEADER_LEN: usize = 8;
const RECORD_HEADER_LEN: usize = 9;
/// Larger lengths are treated as garbage when scanning.
const MAX_RECORD_LEN: usize = 1 << 30;

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;

/// Appends one record to `out`.
fn encode_record(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    let mut crc = crc32c::crc32c(&[kind]);
    crc = crc32c::crc32c_append(crc, payload);
    // Invariant: records are built from single entries far below 4 GiB.
    let len = u32::try_from(payload.len()).expect("raft log record under 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

/// Appends an Entry record to `out`.
pub(crate) fn encode_entry(entry: &Entry, out: &mut Vec<u8>) -> Result<(), RaftError> {
    let payload =
        entry.write_to_bytes().map_err(|e| RaftError::Encode(format!("raft entry index={}: {e}", entry.index)))?;
    encode_record(KIND_ENTRY, &payload, out);
    Ok(())
}

/// Appends a HardState record to `out`.
pub(crate) fn encode_hard_state(hs: &HardState, out: &mut Vec<u8>) -> Result<(), RaftError> {
    let payload = hs.write_to_bytes().map_err(|e| RaftError::Encode(format!("raft hard state: {e}")))?;
    encode_record(KIND_HARD_STATE, &payload, out);
    Ok(())
}

/// The file header.
pub(crate) fn header() -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(LOG_MAGIC);
    h.extend_from_slice(&LOG_VERSION.to_le_bytes());
    h
}

/// What a replay of the log found.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    /// The last hard state in the log, if any.
    pub hard_state: Option<HardState>,
    /// Entries after the snapshot index, contiguous.
    pub entries: Vec<Entry>,
    /// Bytes of valid records (header included); the file is truncated to this.
    pub valid_len: u64,
    /// Bytes of torn tail dropped.
    pub torn_bytes: u64,
}

/// One well-formed record: kind, payload and the offset just after it.
struct RawRecord<'a> {
    kind: u8,
    payload: &'a [u8],
    next: usize,
}

/// Parses the record at `off`, or `None` if it is short, has a bad checksum or an unknown kind.
fn parse_record(buf: &[u8], off: usize) -> Option<RawRecord<'_>> {
    let head = buf.get(off..off.checked_add(RECORD_HEADER_LEN)?)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let kind = head[8];
    if len > MAX_RECORD_LEN || !matches!(kind, KIND_ENTRY | KIND_HARD_STATE) {
        return None;
    }
    let start = off + RECORD_HEADER_LEN;
    let payload = buf.get(start..start.checked_add(len)?)?;
    let actual = crc32c::crc32c_append(crc32c::crc32c(&[kind]), payload);
    (actual == crc).then_some(RawRecord { kind, payload, next: start + len })
}

/// True if any offset after `off` starts a well-formed record.
fn valid_record_after(buf: &[u8], off: usize) -> bool {
    (off + 1..buf.len()).any(|p| parse_record(buf, p).is_some())
}

fn corrupt(path: &Path, offset: usize, reason: impl Into<String>) -> RaftError {
    RaftError::CorruptLog { path: path.display().to_string(), offset: offset as u64, reason: reason.into() }
}

/// Checks the header: magic, then version.
fn check_header(buf: &[u8], path: &Path) -> Result<(), RaftError> {
    if buf.len() < HEADER_LEN || &buf[..4] != LOG_MAGIC {
        return Err(corrupt(path, 0, "bad magic or short header"));
    }
    let found = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if found != LOG_VERSION {
        return Err(RaftError::UnsupportedVersion { found, supported: LOG_VERSION });
    }
    Ok(())
}

/// Adds one replayed entry, applying the overwrite rule.
fn push_entry(out: &mut Vec<Entry>, e: Entry, snapshot_index: u64, path: &Path, off: usize) -> Result<(), RaftError> {
    if e.index <= snapshot_index {
        return Ok(());
    }
    let next = out.last().map_or(snapshot_index + 1, |l| l.index + 1);
    if e.index > next {
        return Err(corrupt(path, off, format!("gap in log index={} expected<={next}", e.index)));
    }
    if e.index < next {
        // Invariant: out[0].index == snapshot_index + 1 and e.index > snapshot_index, so the
        // position is inside `out`.
        let keep = (e.index - (snapshot_index + 1)) as usize;
        out.truncate(keep);
    }
    out.push(e);
    Ok(())
}

/// Replays the records of a whole log file held in `buf`.
pub(crate) fn replay(buf: &[u8], path: &Path, snapshot_index: u64) -> Result<Replayed, RaftError> {
    check_header(buf, path)?;
    let mut r = Replayed::default();
    let mut off = HEADER_LEN;
    while off < buf.len() {
        let Some(rec) = parse_record(buf, off) else {
            if valid_record_after(buf, off) {
                return Err(corrupt(path, off, "bad record followed by valid records"));
            }
            r.torn_bytes = (buf.len() - off) as u64;
            break;
        };
        match rec.kind {
            KIND_ENTRY => {
                let e = Entry::parse_from_bytes(rec.payload)
                    .map_err(|e| corrupt(path, off, format!("entry does not decode: {e}")))?;
                push_entry(&mut r.entries, e, snapshot_index, path, off)?;
            }
            _ => {
                let hs = HardState::parse_from_bytes(rec.payload)
                    .map_err(|e| corrupt(path, off, format!("hard state does not decode: {e}")))?;
                r.hard_state = Some(hs);
            }
        }
        off = rec.next;
    }
    r.valid_len = off as u64;
    Ok(r)
}

/// The open log file, positioned for appends.
pub(crate) struct LogFile {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    len_bytes: u64,
}

impl LogFile {
    /// Opens (or creates) `dir/raft.log`, replays it and truncates a torn tail.
    pub(crate) fn open(dir: &Path, snapshot_index: u64) -> Result<(LogFile, Replayed), RaftError> {
        let path = dir.join(LOG_FILE);
        if !path.exists() {
            replace_file(dir, LOG_FILE, &header())?;
        }
        let buf = std::fs::read(&path).map_err(io_err(&path))?;
        let replayed = replay(&buf, &path, snapshot_index)?;
        let file = OpenOptions::new().append(true).open(&path).map_err(io_err(&path))?;
        if replayed.torn_bytes > 0 {
            tracing::warn!(
                path = %path.display(),
                torn_bytes = replayed.torn_bytes,
                "raft log: discarding torn tail"
            );
            file.set_len(replayed.valid_len).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
        }
        let log = LogFile { dir: dir.to_path_buf(), path, file, len_bytes: replayed.valid_len };
        Ok((log, replayed))
    }

    /// Appends encoded records and makes them durable with one fsync.
    pub(crate) fn append(&mut self, records: &[u8]) -> Result<(), RaftError> {
        if records.is_empty() {
            return Ok(());
        }
        self.file.write_all(records).map_err(io_err(&self.path))?;
        self.file.sync_data().map_err(io_err(&self.path))?;
        self.len_bytes += records.len() as u64;
        Ok(())
    }

    /// Replaces the log with one holding `hs` and `entries` (the entries after a snapshot).
    ///
    /// Commit point: the rename inside [`replace_file`]. Before it the old log is intact, and
    /// entries it holds that the new snapshot covers are skipped on replay; after it the new
    /// log is complete.
    pub(crate) fn rewrite(&mut self, hs: &HardState, entries: &[Entry]) -> Result<(), RaftError> {
        let mut buf = header();
        encode_hard_state(hs, &mut buf)?;
        for e in entries {
            encode_entry(e, &mut buf)?;
        }
        replace_file(&self.dir, LOG_FILE, &buf)?;
        self.file = OpenOptions::new().append(true).open(&self.path).map_err(io_err(&self.path))?;
        self.len_bytes = buf.len() as u64;
        Ok(())
    }

    /// Current size of the log file.
    pub(crate) fn len_bytes(&self) -> u64 {
        self.len_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry { index, term, data: data.to_vec().into(), ..Default::default() }
    }

    fn file(entries: &[Entry], hs: Option<&HardState>) -> Vec<u8> {
        let mut buf = header();
        for e in entries {
            encode_entry(e, &mut buf).expect("encode");
        }
        if let Some(hs) = hs {
            encode_hard_state(hs, &mut buf).expect("encode");
        }
        buf
    }

    fn indexes_terms(r: &Replayed) -> Vec<(u64, u64)> {
        r.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn later_entry_overwrites_conflicting_suffix() {
        let hs = HardState { term: 2, commit: 3, ..Default::default() };
        let ents = [entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c"), entry(3, 2, b"C"), entry(4, 2, b"d")];
        let r = replay(&file(&ents, Some(&hs)), Path::new("t"), 0).expect("replay");
        assert_eq!(indexes_terms(&r), vec![(1, 1), (2, 1), (3, 2), (4, 2)]);
        assert_eq!(r.entries[2].get_data(), b"C");
        assert_eq!(r.hard_state.map(|h| h.commit), Some(3));
    }

    #[test]
    fn entries_covered_by_the_snapshot_are_skipped() {
        let ents = [entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")];
        let r = replay(&file(&ents, None), Path::new("t"), 2).expect("replay");
        assert_eq!(indexes_terms(&r), vec![(3, 1)]);
    }

    #[test]
    fn a_gap_is_corruption() {
        let ents = [entry(1, 1, b"a"), entry(3, 1, b"c")];
        let err = replay(&file(&ents, None), Path::new("t"), 0).expect_err("gap");
        assert!(matches!(err, RaftError::CorruptLog { .. }), "{err}");
    }

    #[test]
    fn torn_tail_vs_corrupt_middle() {
        let ents = [entry(1, 1, b"a"), entry(2, 1, b"b")];
        let good = file(&ents, None);
        let mut torn = good.clone();
        torn.extend_from_slice(&good[HEADER_LEN..HEADER_LEN + 12]);
        let r = replay(&torn, Path::new("t"), 0).expect("torn tail");
        assert_eq!(r.valid_len, good.len() as u64);
        assert_eq!(r.torn_bytes, 12);
        assert_eq!(r.entries.len(), 2);

        let mut bad = good.clone();
        bad[HEADER_LEN + RECORD_HEADER_LEN + 1] ^= 1;
        let err = replay(&bad, Path::new("t"), 0).expect_err("corrupt");
        assert!(matches!(err, RaftError::CorruptLog { offset: 8, .. }), "{err}");
    }
}
