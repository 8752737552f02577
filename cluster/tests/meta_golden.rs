//! Golden tests of the meta snapshot encoding: the bytes of a small fixed state are pinned
//! with insta (a change to them is a format change: bump `SNAPSHOT_VERSION` and migrate),
//! older versions still decode (`fixtures/meta_snapshot_v1.hex` and `_v2.hex`, written by
//! versions 1 and 2), and every malformed input is a clear error.

use std::fmt::Write as _;

use tidepool_cluster::meta::{
    AccessKey, BlockState, Command, MetaState, NewBlock, NewKind, NodeInfo, ObjectKind, SNAPSHOT_VERSION, TieredBlock,
};
use tidepool_cluster::raft::StateMachine;

/// A small state touching every type: dirs, a file with split extents, a symlink, user
/// metadata and a tiered block.
fn fixed_state() -> MetaState {
    let mut s = MetaState::new();
    let log = [
        Command::Create {
            parent: 1,
            name: b"ckpt".to_vec(),
            kind: NewKind::Dir,
            mode: 0o40755,
            uid: 1000,
            gid: 1000,
            now: 1_700_000_000_000_000_000,
        },
        Command::Create {
            parent: 2,
            name: b"step-1".to_vec(),
            kind: NewKind::File,
            mode: 0o100644,
            uid: 1000,
            gid: 1000,
            now: 1_700_000_001_000_000_000,
        },
        Command::AllocBlockIds { count: 4 },
        Command::Write {
            ino: 3,
            offset: 0,
            blocks: vec![NewBlock { id: 1, len: 4096 }, NewBlock { id: 2, len: 100 }],
            now: 1_700_000_002_000_000_000,
        },
        Command::Write {
            ino: 3,
            offset: 1000,
            blocks: vec![NewBlock { id: 3, len: 10 }],
            now: 1_700_000_003_000_000_000,
        },
        Command::SetXattr { ino: 3, key: "dataset".into(), value: "train".into(), now: 1_700_000_004_000_000_000 },
        Command::SetXattr { ino: 3, key: "loss".into(), value: "0.31".into(), now: 1_700_000_004_000_000_000 },
        Command::Create {
            parent: 1,
            name: b"latest".to_vec(),
            kind: NewKind::Symlink { target: b"ckpt/step-1".to_vec() },
            mode: 0o777,
            uid: 0,
            gid: 0,
            now: 1_700_000_005_000_000_000,
        },
        Command::RecordTiered {
            object: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            kind: ObjectKind::Pack,
            size_bytes: 8192,
            blocks: vec![TieredBlock { id: 2, offset: 4096, len: 100, crc: 0xdead_beef }],
            from: None,
            now: 1_700_000_006_000_000_000,
        },
    ];
    for cmd in &log {
        s.apply(cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    }
    s.check_invariants().expect("fixed state is consistent");
    s
}

/// `fixed_state` plus access keys (snapshot version 2): two put, one of them revoked, a third put.
fn fixed_state_v2() -> MetaState {
    let mut s = fixed_state();
    let key = |seal: u8, name: &str| AccessKey {
        secret_sealed: vec![seal; 40],
        created: 1_700_000_006_000_000_000,
        name: name.into(),
    };
    let log = [
        Command::PutAccessKey { id: "TPAAAAAAAAAAAAAAAAAA".into(), key: key(0xa1, "first") },
        Command::PutAccessKey { id: "TPBBBBBBBBBBBBBBBBBB".into(), key: key(0xb2, "") },
        Command::DeleteAccessKey { id: "TPAAAAAAAAAAAAAAAAAA".into() },
        Command::PutAccessKey { id: "TPCCCCCCCCCCCCCCCCCC".into(), key: key(0xc3, "ci") },
    ];
    for cmd in &log {
        s.apply(cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    }
    s.check_invariants().expect("fixed state is consistent");
    s
}

/// `fixed_state_v2` plus a pin and a manifest epoch (snapshot version 3 added the cold tier).
fn fixed_state_v3() -> MetaState {
    let mut s = fixed_state_v2();
    s.apply(&Command::SetPin { ino: 2, pinned: true }).expect("pin");
    let objects = s.objects.keys().copied().collect();
    s.apply(&Command::KeepObjects { epoch: 1, oldest_retained: 1, objects }).expect("keep");
    s.check_invariants().expect("fixed state is consistent");
    s
}

/// What an older snapshot of `s` becomes when read by this version: nothing was ever tiered
/// before version 3, so every block is dirty and its write time unknown (0).
/// `fixed_state_v3` plus two cluster nodes (snapshot version 4 added them).
fn fixed_state_v4() -> MetaState {
    let mut s = fixed_state_v3();
    for (id, ip) in [(1u64, "127.0.0.1"), (0x5eed_0000_0000_0002, "127.0.0.2")] {
        let info = NodeInfo {
            addr: format!("{ip}:7100"),
            s3: format!("{ip}:9000"),
            nfs: format!("{ip}:11111"),
            http: format!("{ip}:9100"),
            joined: 1_700_000_000_000_000_000,
        };
        s.apply(&Command::SetNode { id, info }).expect("set node");
    }
    s.check_invariants().expect("fixed state is consistent");
    s
}

fn as_migrated(mut s: MetaState) -> MetaState {
    for b in s.blocks.values_mut() {
        b.state = BlockState::Dirty;
        b.written = 0;
    }
    s.objects.clear();
    s.pins.clear();
    (s.manifest_epoch, s.manifest_oldest_retained) = (0, 0);
    s.dirty_bytes = s.blocks.values().map(|b| u64::from(b.len)).sum();
    s.check_invariants().expect("migrated state is consistent");
    s
}

fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in bytes.chunks(32).enumerate() {
        let hex: String = chunk.iter().map(|b| format!("{b:02x}")).collect();
        // Writing to a String cannot fail.
        writeln!(out, "{:04x}: {hex}", i * 32).expect("write to String");
    }
    out
}

fn from_hex_dump(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (_, hex) = line.split_once(": ").expect("offset: hex");
        for i in (0..hex.len()).step_by(2) {
            out.push(u8::from_str_radix(&hex[i..i + 2], 16).expect("hex byte"));
        }
    }
    out
}

#[test]
fn snapshot_v4_bytes_are_pinned() {
    assert_eq!(SNAPSHOT_VERSION, 4);
    let bytes = fixed_state_v4().encode_snapshot();
    assert_eq!(&bytes[0..4], b"TPMS");
    assert_eq!(u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]), SNAPSHOT_VERSION);
    insta::assert_snapshot!("meta_snapshot_v4", hex_dump(&bytes));
}

/// A snapshot written by version 3 (before cluster nodes) restores whole, with no nodes.
#[test]
fn snapshot_v3_still_decodes() {
    let v3 = from_hex_dump(include_str!("fixtures/meta_snapshot_v3.hex"));
    assert_eq!(u32::from_le_bytes([v3[4], v3[5], v3[6], v3[7]]), 3);
    let s = MetaState::decode_snapshot(&v3).expect("v3 decodes");
    assert_eq!(s, fixed_state_v3());
    assert!(s.nodes.is_empty());
    // A version 4 payload labelled version 3 is refused, never misread.
    let v4 = fixed_state_v4().encode_snapshot();
    assert!(MetaState::decode_snapshot(&reheader(&v4, 3)).is_err());
}

/// A snapshot written by version 1 (before access keys) still restores: same namespace,
/// no access keys, every block dirty; written again it becomes the current version.
#[test]
fn snapshot_v1_still_decodes_and_migrates() {
    let v1 = from_hex_dump(include_str!("fixtures/meta_snapshot_v1.hex"));
    assert_eq!(u32::from_le_bytes([v1[4], v1[5], v1[6], v1[7]]), 1);
    let s = MetaState::decode_snapshot(&v1).expect("v1 decodes");
    assert_eq!(s, as_migrated(fixed_state()));
    assert!(s.access_keys.is_empty());
    let again = s.encode_snapshot();
    assert_eq!(u32::from_le_bytes([again[4], again[5], again[6], again[7]]), SNAPSHOT_VERSION);
    assert_eq!(MetaState::decode_snapshot(&again).expect("v3 decodes"), s);
    // A version 2 payload labelled version 1 is refused, never misread.
    let v2 = from_hex_dump(include_str!("fixtures/meta_snapshot_v2.hex"));
    assert!(MetaState::decode_snapshot(&reheader(&v2, 1)).is_err());
}

/// A snapshot written by version 2 (before the cold tier) still restores with its keys.
#[test]
fn snapshot_v2_still_decodes_and_migrates() {
    let v2 = from_hex_dump(include_str!("fixtures/meta_snapshot_v2.hex"));
    assert_eq!(u32::from_le_bytes([v2[4], v2[5], v2[6], v2[7]]), 2);
    let s = MetaState::decode_snapshot(&v2).expect("v2 decodes");
    assert_eq!(s, as_migrated(fixed_state_v2()));
    assert_eq!(s.access_keys.len(), 2);
    // A version 3 payload labelled version 2 is refused, never misread.
    let v3 = fixed_state_v3().encode_snapshot();
    assert!(MetaState::decode_snapshot(&reheader(&v3, 2)).is_err());
}

#[test]
fn snapshot_round_trips_through_the_state_machine_trait() {
    let s = fixed_state_v4();
    let bytes = StateMachine::snapshot(&s);
    let back = <MetaState as StateMachine>::restore(&bytes).expect("restore");
    assert_eq!(back, s);
    assert_eq!(back.resolve(b"/ckpt/step-1").expect("resolve").xattrs.len(), 2);
    let ids: Vec<&str> = back.access_keys.keys().map(String::as_str).collect();
    assert_eq!(ids, ["TPBBBBBBBBBBBBBBBBBB", "TPCCCCCCCCCCCCCCCCCC"]);
    assert_eq!(back.nodes[&0x5eed_0000_0000_0002].s3, "127.0.0.2:9000");
}

fn reheader(bytes: &[u8], version: u32) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[4..8].copy_from_slice(&version.to_le_bytes());
    out
}

#[test]
fn malformed_snapshots_are_clear_errors() {
    let bytes = fixed_state_v4().encode_snapshot();
    let err = |b: &[u8]| MetaState::decode_snapshot(b).expect_err("must not decode");
    assert_eq!(err(&reheader(&bytes, 5)), "unsupported meta snapshot version found=5 supported=1..=4");
    assert_eq!(err(&reheader(&bytes, 0)), "unsupported meta snapshot version found=0 supported=1..=4");
    let mut magic = bytes.clone();
    magic[0] = b'X';
    assert_eq!(err(&magic), "not a meta snapshot: bad magic [58, 50, 4d, 53]");
    assert_eq!(err(&bytes[..7]), "meta snapshot truncated: header needs 12 bytes, got 7");
    assert!(err(&bytes[..bytes.len() - 1]).starts_with("meta snapshot checksum mismatch (corrupt or truncated)"));
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert!(err(&flipped).starts_with("meta snapshot checksum mismatch"));
}

#[test]
fn inconsistent_payload_with_good_checksum_is_rejected() {
    let mut s = fixed_state_v3();
    s.blocks.get_mut(&1).expect("block 1").refs = 7;
    let bytes = s.encode_snapshot();
    let e = MetaState::decode_snapshot(&bytes).expect_err("refs mismatch");
    assert_eq!(e, "meta snapshot inconsistent: block refs wrong block_id=1 refs=7 extents=2");
    let mut s = fixed_state_v3();
    s.objects.values_mut().for_each(|o| o.live_bytes += 1);
    let e = MetaState::decode_snapshot(&s.encode_snapshot()).expect_err("live bytes");
    assert!(e.starts_with("meta snapshot inconsistent: object live counts wrong"), "{e}");
    let mut s = fixed_state_v3();
    s.dirty_bytes += 1;
    let e = MetaState::decode_snapshot(&s.encode_snapshot()).expect_err("dirty bytes");
    assert!(e.starts_with("meta snapshot inconsistent: dirty_bytes="), "{e}");
    let mut s = fixed_state_v3();
    s.access_keys.insert("lowercase-id-is-not-valid".into(), s.access_keys["TPBBBBBBBBBBBBBBBBBB"].clone());
    let e = MetaState::decode_snapshot(&s.encode_snapshot()).expect_err("bad key id");
    assert!(e.starts_with("meta snapshot inconsistent: bad access key id=\"lowercase-id-is-not-valid\""), "{e}");
}
