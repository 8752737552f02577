//! Building and decoding chunk and pack objects (layout in the module doc of `format`).

use std::ops::Range;

use bytes::Bytes;

use super::{FormatError, ObjectId, ObjectKind};

/// The format version this build writes and the only one it reads.
pub const VERSION: u16 = 1;

/// Size of the fixed trailer at the very end of every object (the same in every version).
pub const TRAILER_LEN: usize = 48;

/// Size of one index record.
pub const INDEX_ENTRY_LEN: usize = 40;

const MAGIC_CHUNK: [u8; 4] = *b"TPCK";
const MAGIC_PACK: [u8; 4] = *b"TPPK";
const KIND_CHUNK: u8 = 1;
const KIND_PACK: u8 = 2;
/// Trailer bytes covered by the trailer's own crc (all but the crc itself).
const TRAILER_CRC_AT: usize = TRAILER_LEN - 4;

impl ObjectKind {
    fn magic(self) -> [u8; 4] {
        match self {
            ObjectKind::Chunk => MAGIC_CHUNK,
            ObjectKind::Pack => MAGIC_PACK,
        }
    }

    fn code(self) -> u8 {
        match self {
            ObjectKind::Chunk => KIND_CHUNK,
            ObjectKind::Pack => KIND_PACK,
        }
    }
}

/// One block inside an object, as the footer index records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub block: u64,
    pub ino: u64,
    pub file_offset: u64,
    /// Where the block's bytes start in the object.
    pub offset: u64,
    pub len: u32,
    /// crc32c of the block's bytes.
    pub crc: u32,
}

impl IndexEntry {
    /// The block's bytes in the object, for a ranged GET.
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + u64::from(self.len)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.block.to_le_bytes());
        out.extend_from_slice(&self.ino.to_le_bytes());
        out.extend_from_slice(&self.file_offset.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
    }

    fn decode(rec: &[u8; INDEX_ENTRY_LEN]) -> Self {
        IndexEntry {
            block: le_u64(rec, 0),
            ino: le_u64(rec, 8),
            file_offset: le_u64(rec, 16),
            offset: le_u64(rec, 24),
            len: le_u32(rec, 32),
            crc: le_u32(rec, 36),
        }
    }
}

/// Builds one object in memory: block bytes back to back, then the footer.
#[derive(Debug)]
pub struct ObjectBuilder {
    kind: ObjectKind,
    id: ObjectId,
    buf: Vec<u8>,
    entries: Vec<IndexEntry>,
}

impl ObjectBuilder {
    pub fn new(kind: ObjectKind, id: ObjectId) -> Self {
        ObjectBuilder { kind, id, buf: Vec::new(), entries: Vec::new() }
    }

    /// Appends a block; returns its entry (offset in the object, len, crc32c of data).
    ///
    /// A chunk object holds blocks of one file: every `ino` must be the first one's.
    pub fn add(&mut self, block: u64, ino: u64, file_offset: u64, data: &[u8]) -> IndexEntry {
        debug_assert!(
            self.kind == ObjectKind::Pack || self.entries.first().is_none_or(|e| e.ino == ino),
            "chunk object holds blocks of one file ino={ino}"
        );
        // Invariant: a block is at most the block size (a few MiB), far below 4 GiB.
        let len = u32::try_from(data.len()).expect("block length fits in u32");
        let entry = IndexEntry { block, ino, file_offset, offset: self.data_len(), len, crc: crc32c::crc32c(data) };
        self.buf.extend_from_slice(data);
        self.entries.push(entry);
        entry
    }

    /// Bytes of block data so far (to decide when the object is full).
    pub fn data_len(&self) -> u64 {
        self.buf.len() as u64
    }

    /// Number of blocks so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// The whole object: data, index, trailer.
    pub fn finish(self) -> Bytes {
        let ObjectBuilder { kind, id, mut buf, entries } = self;
        let index_offset = buf.len() as u64;
        // Invariant: objects are at most a few hundred MiB of blocks, so fewer than 2^32 / 40
        // records.
        let count = u32::try_from(entries.len()).expect("block count fits in u32");
        let index_len = count.checked_mul(INDEX_ENTRY_LEN as u32).expect("index length fits in u32");
        buf.reserve(index_len as usize + TRAILER_LEN);
        for e in &entries {
            e.encode(&mut buf);
        }
        let index_crc = crc32c::crc32c(&buf[index_offset as usize..]);
        let trailer = Trailer { kind, id, count, index_offset, index_len, index_crc };
        buf.extend_from_slice(&trailer.encode());
        Bytes::from(buf)
    }
}

/// The fixed trailer at the end of every object, decoded and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub kind: ObjectKind,
    pub id: ObjectId,
    /// Number of blocks (index records).
    pub count: u32,
    /// Where the index starts; also the total length of the block bytes.
    pub index_offset: u64,
    pub index_len: u32,
    /// crc32c of the index bytes.
    pub index_crc: u32,
}

impl Trailer {
    /// The index's bytes in the object, for a ranged GET.
    pub fn index_range(&self) -> Range<u64> {
        self.index_offset..self.index_offset + u64::from(self.index_len)
    }

    /// The object's total length: data, index and trailer.
    pub fn object_len(&self) -> u64 {
        self.index_range().end + TRAILER_LEN as u64
    }

    fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut t = [0u8; TRAILER_LEN];
        t[0..4].copy_from_slice(&self.kind.magic());
        t[4..6].copy_from_slice(&VERSION.to_le_bytes());
        t[6] = self.kind.code();
        // t[7] is reserved: written 0, not read.
        t[8..24].copy_from_slice(&self.id.0.to_le_bytes());
        t[24..28].copy_from_slice(&self.count.to_le_bytes());
        t[28..36].copy_from_slice(&self.index_offset.to_le_bytes());
        t[36..40].copy_from_slice(&self.index_len.to_le_bytes());
        t[40..44].copy_from_slice(&self.index_crc.to_le_bytes());
        let crc = crc32c::crc32c(&t[..TRAILER_CRC_AT]);
        t[TRAILER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        t
    }
}

/// Decodes and checks the trailer from the object's last `TRAILER_LEN` bytes. `tail` may be a
/// longer suffix of the object (one GET for trailer and index); only its last `TRAILER_LEN`
/// bytes are read.
///
/// The magic and version are checked before the crc, so an object written by a later version
/// is reported as [`FormatError::UnknownVersion`] rather than as corrupt.
pub fn decode_trailer(tail: &[u8]) -> Result<Trailer, FormatError> {
    let Some(start) = tail.len().checked_sub(TRAILER_LEN) else {
        return Err(FormatError::Truncated { what: "trailer", need: TRAILER_LEN as u64, got: tail.len() as u64 });
    };
    let t: &[u8; TRAILER_LEN] =
        tail[start..].try_into().expect("slice of TRAILER_LEN bytes is an array of TRAILER_LEN bytes");
    let magic_kind = if t[0..4] == MAGIC_CHUNK {
        ObjectKind::Chunk
    } else if t[0..4] == MAGIC_PACK {
        ObjectKind::Pack
    } else {
        return Err(FormatError::BadMagic);
    };
    let version = u16::from_le_bytes([t[4], t[5]]);
    if version != VERSION {
        return Err(FormatError::UnknownVersion { version });
    }
    let expected = le_u32(t, TRAILER_CRC_AT);
    let actual = crc32c::crc32c(&t[..TRAILER_CRC_AT]);
    if expected != actual {
        return Err(FormatError::Checksum { what: "trailer", expected, actual });
    }
    if t[6] != magic_kind.code() {
        return Err(FormatError::BadKind { magic: magic_kind, kind: t[6] });
    }
    let trailer = Trailer {
        kind: magic_kind,
        id: ObjectId(u128::from_le_bytes(t[8..24].try_into().expect("16-byte slice is a 16-byte array"))),
        count: le_u32(t, 24),
        index_offset: le_u64(t, 28),
        index_len: le_u32(t, 36),
        index_crc: le_u32(t, 40),
    };
    let want_index_len = u64::from(trailer.count) * INDEX_ENTRY_LEN as u64;
    if u64::from(trailer.index_len) != want_index_len {
        return Err(FormatError::BadLength {
            what: "index",
            expected: want_index_len,
            actual: u64::from(trailer.index_len),
        });
    }
    // The object's length must fit in u64 (and `object_len` must not overflow).
    let max_index_offset = u64::MAX - u64::from(trailer.index_len) - TRAILER_LEN as u64;
    if trailer.index_offset > max_index_offset {
        return Err(FormatError::BadLength {
            what: "index_offset",
            expected: max_index_offset,
            actual: trailer.index_offset,
        });
    }
    Ok(trailer)
}

/// Decodes and checks the index (bytes `index_offset..index_offset + index_len` of the object):
/// its crc, that the blocks lie back to back from offset 0 to `index_offset`, and for a chunk
/// object that every block belongs to one file.
pub fn decode_index(trailer: &Trailer, index: &[u8]) -> Result<Vec<IndexEntry>, FormatError> {
    let want = u64::from(trailer.index_len);
    let got = index.len() as u64;
    if got < want {
        return Err(FormatError::Truncated { what: "index", need: want, got });
    }
    if got > want {
        return Err(FormatError::BadLength { what: "index", expected: want, actual: got });
    }
    let actual = crc32c::crc32c(index);
    if actual != trailer.index_crc {
        return Err(FormatError::Checksum { what: "index", expected: trailer.index_crc, actual });
    }
    let mut entries: Vec<IndexEntry> = Vec::with_capacity(trailer.count as usize);
    let mut next_offset = 0u64;
    for (i, rec) in (0u32..).zip(index.chunks_exact(INDEX_ENTRY_LEN)) {
        let rec = rec.try_into().expect("chunks_exact yields INDEX_ENTRY_LEN-byte records");
        let e = IndexEntry::decode(rec);
        if e.offset != next_offset {
            return Err(FormatError::BadOffset { entry: i, block: e.block, expected: next_offset, actual: e.offset });
        }
        if trailer.kind == ObjectKind::Chunk
            && let Some(first) = entries.first()
            && e.ino != first.ino
        {
            return Err(FormatError::ChunkInodes { block: e.block, expected: first.ino, actual: e.ino });
        }
        next_offset = e.range().end;
        entries.push(e);
    }
    if next_offset != trailer.index_offset {
        return Err(FormatError::BadLength { what: "blocks", expected: trailer.index_offset, actual: next_offset });
    }
    Ok(entries)
}

/// Convenience: decode a whole object (trailer, index) and check every block's crc.
pub fn decode_object(bytes: &[u8]) -> Result<(Trailer, Vec<IndexEntry>), FormatError> {
    let trailer = decode_trailer(bytes)?;
    let want = trailer.object_len();
    let got = bytes.len() as u64;
    if got < want {
        return Err(FormatError::Truncated { what: "object", need: want, got });
    }
    if got > want {
        return Err(FormatError::BadLength { what: "object", expected: want, actual: got });
    }
    // The lengths above match, so the ranges below lie inside `bytes` (and inside usize).
    let Range { start, end } = trailer.index_range();
    let entries = decode_index(&trailer, &bytes[start as usize..end as usize])?;
    for e in &entries {
        let Range { start, end } = e.range();
        let actual = crc32c::crc32c(&bytes[start as usize..end as usize]);
        if actual != e.crc {
            return Err(FormatError::BlockChecksum { block: e.block, expected: e.crc, actual });
        }
    }
    Ok((trailer, entries))
}

/// Checks a block's bytes as fetched by a ranged GET against its expected length and crc.
pub fn verify_block(data: &[u8], len: u32, crc: u32) -> Result<(), FormatError> {
    let got = data.len() as u64;
    let want = u64::from(len);
    if got < want {
        return Err(FormatError::Truncated { what: "block", need: want, got });
    }
    if got > want {
        return Err(FormatError::BadLength { what: "block", expected: want, actual: got });
    }
    let actual = crc32c::crc32c(data);
    if actual != crc {
        return Err(FormatError::Checksum { what: "block", expected: crc, actual });
    }
    Ok(())
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte slice is an 8-byte array"))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte slice is a 4-byte array"))
}
