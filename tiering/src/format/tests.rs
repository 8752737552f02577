//! Unit tests of the key layout and the builder; goldens, corruption and property tests of
//! the object format are in `tiering/tests/format.rs`.

use rand::SeedableRng;

use super::*;

#[test]
fn crc32c_is_castagnoli() {
    // The standard check value of CRC-32C (iSCSI): the format depends on this exact polynomial.
    assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
}

#[test]
fn id_displays_as_32_lowercase_hex_digits() {
    assert_eq!(ObjectId(0).to_string(), "00000000000000000000000000000000");
    assert_eq!(ObjectId(0xAB).to_string(), "000000000000000000000000000000ab");
    assert_eq!(ObjectId(u128::MAX).to_string(), "ffffffffffffffffffffffffffffffff");
}

#[test]
fn key_layout() {
    let id = ObjectId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
    let xx = crc32c::crc32c(&id.0.to_le_bytes()) & 0xff;
    assert_eq!(id.key(ObjectKind::Chunk), format!("chunks/{xx:02x}/0123456789abcdeffedcba9876543210"));
    assert_eq!(id.key(ObjectKind::Pack), format!("packs/{xx:02x}/0123456789abcdeffedcba9876543210"));
    // Pinned (checked with an independent crc32c) so a change to the prefix hash, which would
    // orphan every object, fails loudly.
    assert_eq!(ObjectId(1).key(ObjectKind::Chunk), "chunks/14/00000000000000000000000000000001");
}

#[test]
fn parse_key_round_trips() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    for _ in 0..1000 {
        let id = ObjectId::from_rng(&mut rng);
        for kind in [ObjectKind::Chunk, ObjectKind::Pack] {
            assert_eq!(ObjectId::parse_key(&id.key(kind)), Some((kind, id)));
        }
    }
    for id in [ObjectId(0), ObjectId(u128::MAX), ObjectId::random()] {
        assert_eq!(ObjectId::parse_key(&id.key(ObjectKind::Pack)), Some((ObjectKind::Pack, id)));
    }
}

#[test]
fn parse_key_rejects_other_keys() {
    let id = ObjectId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
    let good = id.key(ObjectKind::Chunk);
    let xx = &good[7..9];
    let hex = id.to_string();
    let wrong_xx = format!("{:02x}", id.hash_prefix().wrapping_add(1));
    let bad = [
        String::new(),
        "chunks".to_owned(),
        format!("chunks/{xx}"),
        format!("chunks/{xx}/"),
        format!("manifests/{xx}/{hex}"),
        format!("chunk/{xx}/{hex}"),
        format!("chunks/{wrong_xx}/{hex}"),
        format!("chunks/{xx}/{}", hex.to_uppercase()),
        format!("chunks/{}/{hex}", xx.to_uppercase()),
        format!("chunks/{xx}/{}", &hex[1..]),
        format!("chunks/{xx}/0{hex}"),
        format!("chunks/{xx}/+{}", &hex[1..]),
        format!("chunks/0{xx}/{hex}"),
        format!("chunks/{xx}/{hex}/"),
        format!("chunks/{xx}/{hex}/more"),
        format!("/chunks/{xx}/{hex}"),
        format!("chunks//{xx}/{hex}"),
    ];
    for key in &bad {
        assert_eq!(ObjectId::parse_key(key), None, "{key:?}");
    }
}

#[test]
fn builder_counts_and_offsets() {
    let mut b = ObjectBuilder::new(ObjectKind::Pack, ObjectId(9));
    assert!(b.is_empty());
    assert_eq!(b.data_len(), 0);
    let e0 = b.add(100, 5, 0, b"hello");
    let e1 = b.add(101, 6, 4096, b"");
    let e2 = b.add(102, 5, 8192, b"world!");
    assert_eq!((b.len(), b.data_len()), (3, 11));
    assert_eq!(b.entries(), &[e0, e1, e2]);
    assert_eq!(e0, IndexEntry { block: 100, ino: 5, file_offset: 0, offset: 0, len: 5, crc: crc32c::crc32c(b"hello") });
    assert_eq!((e1.offset, e1.len), (5, 0));
    assert_eq!((e2.offset, e2.len, e2.range()), (5, 6, 5..11));
    let bytes = b.finish();
    assert_eq!(bytes.len(), 11 + 3 * INDEX_ENTRY_LEN + TRAILER_LEN);
    assert_eq!(&bytes[..11], b"helloworld!");
    let (trailer, entries) = decode_object(&bytes).expect("a built object decodes");
    assert_eq!(entries, vec![e0, e1, e2]);
    assert_eq!(trailer.object_len(), bytes.len() as u64);
}

#[test]
fn empty_object_is_just_a_trailer() {
    let bytes = ObjectBuilder::new(ObjectKind::Chunk, ObjectId(1)).finish();
    assert_eq!(bytes.len(), TRAILER_LEN);
    let (trailer, entries) = decode_object(&bytes).expect("an empty object decodes");
    assert_eq!((trailer.count, trailer.index_offset, trailer.index_len), (0, 0, 0));
    assert!(entries.is_empty());
}

#[test]
fn error_messages_are_lower_case_with_values_at_the_end() {
    let e = FormatError::Checksum { what: "index", expected: 0xdead_beef, actual: 1 };
    assert_eq!(e.to_string(), "checksum mismatch what=index expected=0xdeadbeef actual=0x00000001");
    let e = FormatError::UnknownVersion { version: 2 };
    assert_eq!(e.to_string(), "unknown object format version version=2");
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "chunk object holds blocks of one file")]
fn chunk_builder_refuses_a_second_file() {
    let mut b = ObjectBuilder::new(ObjectKind::Chunk, ObjectId(3));
    b.add(1, 10, 0, b"a");
    b.add(2, 11, 0, b"b");
}

#[test]
fn fresh_ids_carry_their_creation_time_and_stay_distinct() {
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let ids: Vec<ObjectId> = (0..1000).map(|_| ObjectId::random()).collect();
    let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    for id in &ids {
        assert!((before..=after).contains(&id.created_unix_ms()), "{id}");
    }
    let distinct: std::collections::HashSet<u128> = ids.iter().map(|i| i.0).collect();
    assert_eq!(distinct.len(), ids.len());
    assert_eq!(ObjectId(42).created_unix_ms(), 0, "an id planted by hand reads as old");
}
