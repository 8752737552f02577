//! Tests of the chunk and pack object format: the bytes of a small object of each kind are
//! pinned with insta (a change to them is a format change: bump `VERSION` and keep reading the
//! old one), objects decode from their tail alone, every corruption is a clear error, and
//! random objects round trip (proptest).

use std::fmt::Write as _;

use proptest::prelude::*;
use tidepool_tiering::format::{
    FormatError, INDEX_ENTRY_LEN, IndexEntry, ObjectBuilder, ObjectId, ObjectKind, TRAILER_LEN, Trailer, decode_index,
    decode_object, decode_trailer, verify_block,
};

/// A block as a test adds it: (block id, ino, file offset, bytes).
type Block = (u64, u64, u64, Vec<u8>);

fn build(kind: ObjectKind, id: ObjectId, blocks: &[Block]) -> bytes::Bytes {
    let mut b = ObjectBuilder::new(kind, id);
    for (block, ino, file_offset, data) in blocks {
        b.add(*block, *ino, *file_offset, data);
    }
    b.finish()
}

/// Three blocks of file 42 at offsets 0, 8 and 16, the last one short.
fn fixed_chunk() -> bytes::Bytes {
    build(
        ObjectKind::Chunk,
        ObjectId(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff),
        &[(1000, 42, 0, b"ABCDEFGH".to_vec()), (1001, 42, 8, b"IJKLMNOP".to_vec()), (1002, 42, 16, b"QRS".to_vec())],
    )
}

/// Blocks of three small files.
fn fixed_pack() -> bytes::Bytes {
    build(
        ObjectKind::Pack,
        ObjectId(0xfeed_face_cafe_beef_0123_4567_89ab_cdef),
        &[(7, 100, 0, b"hello\n".to_vec()), (8, 101, 0, b"{\"k\":1}".to_vec()), (9, 102, 0, vec![0, 1, 2, 0xff])],
    )
}

/// The object as hex, in sections: block bytes 32 to a line, one line per index record split
/// into its fields, and the trailer split into its fields.
fn dump(bytes: &[u8], count: usize) -> String {
    let trailer_at = bytes.len() - TRAILER_LEN;
    let index_at = trailer_at - count * INDEX_ENTRY_LEN;
    let hex = |b: &[u8]| {
        b.iter().fold(String::new(), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
    };
    let fields = |b: &[u8], widths: &[usize]| {
        let mut at = 0;
        let parts: Vec<String> = widths
            .iter()
            .map(|w| {
                at += w;
                hex(&b[at - w..at])
            })
            .collect();
        assert_eq!(at, b.len(), "field widths cover the record");
        parts.join(" ")
    };
    let mut out = format!("data 0..{index_at}\n");
    for (i, line) in bytes[..index_at].chunks(32).enumerate() {
        let _ = writeln!(out, "{:04x}: {}", i * 32, hex(line));
    }
    let _ = writeln!(out, "index {index_at}..{trailer_at}: block ino file_offset offset len crc");
    for rec in bytes[index_at..trailer_at].chunks(INDEX_ENTRY_LEN) {
        let _ = writeln!(out, "{}", fields(rec, &[8, 8, 8, 8, 4, 4]));
    }
    let _ = writeln!(
        out,
        "trailer {trailer_at}..{}: magic version kind reserved id count index_offset index_len index_crc crc",
        bytes.len()
    );
    let _ = writeln!(out, "{}", fields(&bytes[trailer_at..], &[4, 2, 1, 1, 16, 4, 8, 4, 4, 4]));
    out
}

#[test]
fn golden_chunk_object() {
    let bytes = fixed_chunk();
    insta::assert_snapshot!("chunk_object", dump(&bytes, 3));
    let (trailer, entries) = decode_object(&bytes).expect("the fixed chunk decodes");
    assert_eq!(&bytes[..4], b"ABCD");
    assert_eq!(&bytes[bytes.len() - TRAILER_LEN..][..6], b"TPCK\x01\x00");
    assert_eq!(
        trailer,
        Trailer {
            kind: ObjectKind::Chunk,
            id: ObjectId(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff),
            count: 3,
            index_offset: 19,
            index_len: 120,
            index_crc: trailer.index_crc,
        }
    );
    assert_eq!(
        entries[2],
        IndexEntry { block: 1002, ino: 42, file_offset: 16, offset: 16, len: 3, crc: crc32c::crc32c(b"QRS") }
    );
}

#[test]
fn golden_pack_object() {
    let bytes = fixed_pack();
    insta::assert_snapshot!("pack_object", dump(&bytes, 3));
    let (trailer, entries) = decode_object(&bytes).expect("the fixed pack decodes");
    assert_eq!(&bytes[bytes.len() - TRAILER_LEN..][..6], b"TPPK\x01\x00");
    assert_eq!((trailer.kind, trailer.count, trailer.index_offset), (ObjectKind::Pack, 3, 17));
    let inos: Vec<u64> = entries.iter().map(|e| e.ino).collect();
    assert_eq!(inos, [100, 101, 102]);
}

#[test]
fn golden_keys() {
    let chunk = ObjectId(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff).key(ObjectKind::Chunk);
    let pack = ObjectId(0xfeed_face_cafe_beef_0123_4567_89ab_cdef).key(ObjectKind::Pack);
    insta::assert_snapshot!("keys", format!("{chunk}\n{pack}\n"));
}

/// What a reader that has only ranged GETs does: the trailer from the last bytes, the index from
/// its range, one block from its range.
#[test]
fn decodes_from_the_tail_then_ranges() {
    for bytes in [fixed_chunk(), fixed_pack()] {
        let tail = &bytes[bytes.len() - TRAILER_LEN..];
        let trailer = decode_trailer(tail).expect("the trailer decodes from the last bytes");
        assert_eq!(trailer.object_len(), bytes.len() as u64);
        let r = trailer.index_range();
        let entries =
            decode_index(&trailer, &bytes[r.start as usize..r.end as usize]).expect("the index decodes from its range");
        assert_eq!(entries, decode_object(&bytes).expect("whole object decodes").1);
        for e in &entries {
            let r = e.range();
            verify_block(&bytes[r.start as usize..r.end as usize], e.len, e.crc).expect("each block checks");
        }
        // A longer suffix (trailer and index in one GET) decodes the same trailer.
        assert_eq!(decode_trailer(&bytes).expect("a longer suffix decodes"), trailer);
    }
}

fn flip(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v[at] ^= 0x40;
    v
}

#[test]
fn corrupt_block_is_detected() {
    let bytes = fixed_chunk();
    // Byte 9 is in block 1001 (offsets 8..16).
    let bad = flip(&bytes, 9);
    assert!(matches!(decode_object(&bad), Err(FormatError::BlockChecksum { block: 1001, .. })));
    let (_, entries) = decode_object(&bytes).expect("the fixed chunk decodes");
    let e = entries[1];
    assert!(matches!(verify_block(&bad[8..16], e.len, e.crc), Err(FormatError::Checksum { what: "block", .. })));
    assert!(matches!(
        verify_block(&bytes[8..15], e.len, e.crc),
        Err(FormatError::Truncated { what: "block", need: 8, got: 7 })
    ));
    assert!(matches!(
        verify_block(&bytes[8..17], e.len, e.crc),
        Err(FormatError::BadLength { what: "block", expected: 8, actual: 9 })
    ));
}

#[test]
fn corrupt_index_is_detected() {
    let bytes = fixed_pack();
    let index_at = bytes.len() - TRAILER_LEN - 3 * INDEX_ENTRY_LEN;
    for at in index_at..bytes.len() - TRAILER_LEN {
        let err = decode_object(&flip(&bytes, at)).expect_err("a flipped index byte is detected");
        assert!(matches!(err, FormatError::Checksum { what: "index", .. }), "byte {at}: {err}");
    }
}

#[test]
fn corrupt_trailer_is_detected() {
    let bytes = fixed_chunk();
    let trailer_at = bytes.len() - TRAILER_LEN;
    for at in trailer_at..bytes.len() {
        let err = decode_object(&flip(&bytes, at)).expect_err("a flipped trailer byte is detected");
        let want = match at - trailer_at {
            0..4 => matches!(err, FormatError::BadMagic),
            4..6 => matches!(err, FormatError::UnknownVersion { .. }),
            _ => matches!(err, FormatError::Checksum { what: "trailer", .. }),
        };
        assert!(want, "byte {}: {err}", at - trailer_at);
    }
}

/// Rewrites the trailer's fields and recomputes its crc, as a buggy or future writer would.
fn patch_trailer(bytes: &[u8], patch: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut v = bytes.to_vec();
    let n = v.len();
    let t = &mut v[n - TRAILER_LEN..];
    patch(t);
    let crc = crc32c::crc32c(&t[..TRAILER_LEN - 4]);
    t[TRAILER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
    v
}

#[test]
fn unknown_version_is_a_clear_error() {
    let bytes = fixed_pack();
    let v2 = patch_trailer(&bytes, |t| t[4..6].copy_from_slice(&2u16.to_le_bytes()));
    let err = decode_object(&v2).expect_err("version 2 is not read");
    assert_eq!(err, FormatError::UnknownVersion { version: 2 });
    assert_eq!(err.to_string(), "unknown object format version version=2");
    assert_eq!(decode_trailer(&v2[v2.len() - TRAILER_LEN..]), Err(FormatError::UnknownVersion { version: 2 }));
}

#[test]
fn trailer_fields_that_disagree_are_errors() {
    let bytes = fixed_chunk();
    // Kind byte saying pack under a chunk magic.
    let bad = patch_trailer(&bytes, |t| t[6] = 2);
    assert_eq!(decode_object(&bad), Err(FormatError::BadKind { magic: ObjectKind::Chunk, kind: 2 }));
    // Index length that is not 40 * count.
    let bad = patch_trailer(&bytes, |t| t[36..40].copy_from_slice(&121u32.to_le_bytes()));
    assert_eq!(decode_object(&bad), Err(FormatError::BadLength { what: "index", expected: 120, actual: 121 }));
    // An index offset that would put the object past u64::MAX.
    let bad = patch_trailer(&bytes, |t| t[28..36].copy_from_slice(&u64::MAX.to_le_bytes()));
    assert!(matches!(decode_object(&bad), Err(FormatError::BadLength { what: "index_offset", .. })));
}

#[test]
fn truncated_or_padded_object_is_detected() {
    let bytes = fixed_chunk();
    for n in 0..bytes.len() {
        assert!(decode_object(&bytes[..n]).is_err(), "first {n} bytes decode");
    }
    for n in 0..bytes.len() {
        assert!(decode_object(&bytes[n + 1..]).is_err(), "bytes {}.. decode", n + 1);
    }
    assert_eq!(
        decode_trailer(&bytes[bytes.len() - 10..]),
        Err(FormatError::Truncated { what: "trailer", need: TRAILER_LEN as u64, got: 10 })
    );
    let mut padded = vec![0u8];
    padded.extend_from_slice(&bytes);
    assert_eq!(
        decode_object(&padded),
        Err(FormatError::BadLength { what: "object", expected: bytes.len() as u64, actual: bytes.len() as u64 + 1 })
    );
    let trailer = decode_trailer(&bytes).expect("the fixed chunk's trailer decodes");
    let r = trailer.index_range();
    let index = &bytes[r.start as usize..r.end as usize];
    assert_eq!(
        decode_index(&trailer, &index[..100]),
        Err(FormatError::Truncated { what: "index", need: 120, got: 100 })
    );
}

/// An index whose crc is right but whose records are wrong: what a buggy writer could upload.
#[test]
fn index_that_breaks_the_layout_is_an_error() {
    let entry = |block, ino, offset, len| IndexEntry { block, ino, file_offset: 0, offset, len, crc: 0 };
    let encode = |entries: &[IndexEntry]| {
        let mut out = Vec::new();
        for e in entries {
            out.extend_from_slice(&e.block.to_le_bytes());
            out.extend_from_slice(&e.ino.to_le_bytes());
            out.extend_from_slice(&e.file_offset.to_le_bytes());
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.len.to_le_bytes());
            out.extend_from_slice(&e.crc.to_le_bytes());
        }
        out
    };
    let check = |kind, index_offset, entries: &[IndexEntry]| {
        let index = encode(entries);
        let trailer = Trailer {
            kind,
            id: ObjectId(1),
            count: entries.len() as u32,
            index_offset,
            index_len: index.len() as u32,
            index_crc: crc32c::crc32c(&index),
        };
        decode_index(&trailer, &index)
    };
    // Gap between blocks.
    assert_eq!(
        check(ObjectKind::Pack, 11, &[entry(1, 1, 0, 5), entry(2, 2, 6, 5)]),
        Err(FormatError::BadOffset { entry: 1, block: 2, expected: 5, actual: 6 })
    );
    // Blocks that end before the index starts.
    assert_eq!(
        check(ObjectKind::Pack, 11, &[entry(1, 1, 0, 5), entry(2, 2, 5, 5)]),
        Err(FormatError::BadLength { what: "blocks", expected: 11, actual: 10 })
    );
    // A chunk with blocks of two files.
    assert_eq!(
        check(ObjectKind::Chunk, 10, &[entry(1, 1, 0, 5), entry(2, 2, 5, 5)]),
        Err(FormatError::ChunkInodes { block: 2, expected: 1, actual: 2 })
    );
    assert!(check(ObjectKind::Pack, 10, &[entry(1, 1, 0, 5), entry(2, 2, 5, 5)]).is_ok());
}

#[test]
fn key_of_every_kind_parses_back() {
    for kind in [ObjectKind::Chunk, ObjectKind::Pack] {
        let id = ObjectId::random();
        let key = id.key(kind);
        assert_eq!(ObjectId::parse_key(&key), Some((kind, id)), "{key}");
    }
}

fn blocks(max_blocks: usize, max_len: usize) -> impl Strategy<Value = Vec<Block>> {
    prop::collection::vec(
        (any::<u64>(), any::<u64>(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..max_len)),
        0..max_blocks,
    )
}

proptest! {
    #[test]
    fn random_objects_round_trip(
        pack in any::<bool>(),
        id in any::<u128>(),
        mut blocks in blocks(20, 300),
        chunk_ino in any::<u64>(),
    ) {
        let kind = if pack { ObjectKind::Pack } else { ObjectKind::Chunk };
        if kind == ObjectKind::Chunk {
            for b in &mut blocks {
                b.1 = chunk_ino;
            }
        }
        let bytes = build(kind, ObjectId(id), &blocks);
        let data_len: usize = blocks.iter().map(|b| b.3.len()).sum();
        prop_assert_eq!(bytes.len(), data_len + blocks.len() * INDEX_ENTRY_LEN + TRAILER_LEN);

        let (trailer, entries) = decode_object(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(trailer.kind, kind);
        prop_assert_eq!(trailer.id, ObjectId(id));
        prop_assert_eq!(trailer.count as usize, blocks.len());
        prop_assert_eq!(entries.len(), blocks.len());
        for (e, (block, ino, file_offset, data)) in entries.iter().zip(&blocks) {
            prop_assert_eq!((e.block, e.ino, e.file_offset), (*block, *ino, *file_offset));
            let r = e.range();
            let got = &bytes[r.start as usize..r.end as usize];
            prop_assert_eq!(got, &data[..]);
            prop_assert!(verify_block(got, e.len, e.crc).is_ok());
        }

        let tail = decode_trailer(&bytes[bytes.len() - TRAILER_LEN..])
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(tail, trailer);
        let r = trailer.index_range();
        let index = decode_index(&trailer, &bytes[r.start as usize..r.end as usize])
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(index, entries);
    }

    /// Any one changed byte anywhere in an object is detected.
    #[test]
    fn any_flipped_byte_is_detected(
        blocks in blocks(6, 64),
        id in any::<u128>(),
        at in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let bytes = build(ObjectKind::Pack, ObjectId(id), &blocks);
        let mut bad = bytes.to_vec();
        let at = at.index(bad.len());
        bad[at] ^= mask;
        prop_assert!(decode_object(&bad).is_err(), "byte {} of {} xor {:#04x}", at, bytes.len(), mask);
    }
}
