//! The cold tier's object formats and the bucket's key layout. Pure: bytes in, bytes out, no I/O.
//!
//! # Keys
//!
//! Relative to the store's prefix:
//!
//! ```text
//! chunks/<xx>/<object id>     one or more consecutive blocks of one large file
//! packs/<xx>/<object id>      blocks of many small files, index in a footer
//! manifests/...               metadata images (not here)
//! ```
//!
//! An object id is a random 128-bit value chosen by the uploader (a crash mid-upload leaves an
//! unreferenced object for garbage collection, never a half-written one under a live name),
//! printed as 32 lowercase hex digits. `<xx>` is two lowercase hex digits: the low byte of the
//! crc32c of the id's 16 little-endian bytes, so keys spread over the store's partitions even
//! if ids were not random. [`ObjectId::parse_key`] checks it.
//!
//! # Objects
//!
//! Chunk and pack objects share one format (all integers little-endian):
//!
//! ```text
//! offset 0        block 0 bytes | block 1 bytes | ... | block n-1 bytes     no padding: a ranged
//!                                                                          GET reads one block
//! index_offset    n index records, 40 bytes each:
//!                   0  block        u64   block id
//!                   8  ino          u64   file the block belongs to
//!                  16  file_offset  u64   where the block sits in that file
//!                  24  offset       u64   where the block sits in this object
//!                  32  len          u32   block length in bytes
//!                  36  crc          u32   crc32c of the block's bytes
//! end - 48        trailer, 48 bytes:
//!                   0  magic        [u8; 4]  "TPCK" (chunk) or "TPPK" (pack)
//!                   4  version      u16      1
//!                   6  kind         u8       1 = chunk, 2 = pack (agrees with the magic)
//!                   7  reserved     u8       0 (not read)
//!                   8  object id    u128     the id in the object's key
//!                  24  count        u32      n, number of blocks
//!                  28  index_offset u64      = total length of the block bytes
//!                  36  index_len    u32      = 40 * n
//!                  40  index_crc    u32      crc32c of the index
//!                  44  trailer_crc  u32      crc32c of trailer bytes 0..44
//! ```
//!
//! Blocks are back to back in index order: record `i`'s `offset` is the sum of the lengths
//! before it and the last block ends at `index_offset`. A chunk object holds blocks of one file
//! (every record has the same `ino`); a pack object holds blocks of many.
//!
//! A reader needs no metadata to read an object: fetch the last [`TRAILER_LEN`] bytes (or a
//! larger suffix) and [`decode_trailer`], fetch `index_offset..index_offset + index_len` and
//! [`decode_index`], then fetch single blocks by range and [`verify_block`] each.
//!
//! `TRAILER_LEN` and the position of the magic and version are the same in every version, so a
//! reader always finds the version; an unknown one is [`FormatError::UnknownVersion`]. The
//! trailer, the index and every block are checksummed: corruption is an error, never wrong data.

mod key;
mod object;

pub use key::{ObjectId, ObjectKind};
pub use object::{
    INDEX_ENTRY_LEN, IndexEntry, ObjectBuilder, TRAILER_LEN, Trailer, VERSION, decode_index, decode_object,
    decode_trailer, verify_block,
};

/// An object's bytes do not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The trailer does not start with `TPCK` or `TPPK`: not a tidepool object, or not its end.
    #[error("bad object magic")]
    BadMagic,
    /// Written by a format version this build does not read.
    #[error("unknown object format version version={version}")]
    UnknownVersion { version: u16 },
    /// The kind byte is not one we know or does not agree with the magic.
    #[error("object kind does not match its magic magic={magic:?} kind={kind}")]
    BadKind { magic: ObjectKind, kind: u8 },
    /// Bytes do not match their crc32c (`what` is `trailer`, `index` or `block`).
    #[error("checksum mismatch what={what} expected={expected:#010x} actual={actual:#010x}")]
    Checksum { what: &'static str, expected: u32, actual: u32 },
    /// A block read out of a whole object does not match its crc32c.
    #[error("block checksum mismatch block={block} expected={expected:#010x} actual={actual:#010x}")]
    BlockChecksum { block: u64, expected: u32, actual: u32 },
    /// Fewer bytes than the format needs.
    #[error("truncated object what={what} need={need} got={got}")]
    Truncated { what: &'static str, need: u64, got: u64 },
    /// A length that disagrees with another one (more bytes than declared, index length versus
    /// count, a block versus its record).
    #[error("bad length what={what} expected={expected} actual={actual}")]
    BadLength { what: &'static str, expected: u64, actual: u64 },
    /// An index record whose offset is not where the blocks before it end.
    #[error("index record out of place entry={entry} block={block} expected={expected} actual={actual}")]
    BadOffset { entry: u32, block: u64, expected: u64, actual: u64 },
    /// A chunk object holding blocks of more than one file.
    #[error("chunk object holds blocks of more than one file block={block} expected_ino={expected} ino={actual}")]
    ChunkInodes { block: u64, expected: u64, actual: u64 },
}

#[cfg(test)]
mod tests;
