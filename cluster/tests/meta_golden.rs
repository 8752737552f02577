//! Golden tests of the meta snapshot encoding: the bytes of a small fixed state are pinned
//! with insta (a change to them is a format change: bump `SNAPSHOT_VERSION` and migrate),
//! older versions still decode (`fixtures/meta_snapshot_v1.hex`, written by version 1), and
//! every malformed input is a clear error.

use std::fmt::Write as _;

use tidepool_cluster::meta::{
    AccessKey, BlockState, Command, MetaState, NewBlock, NewKind, ObjectLocator, SNAPSHOT_VERSION,
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
        Command::SetBlockState {
            id: 2,
            state: BlockState::Clean(ObjectLocator {
                key: "blocks/000001".into(),
                offset: 4096,
                len: 100,
                crc: 0xdead_beef,
            }),
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
fn snapshot_v2_bytes_are_pinned() {
    assert_eq!(SNAPSHOT_VERSION, 2);
    let bytes = fixed_state_v2().encode_snapshot();
    assert_eq!(&bytes[0..4], b"TPMS");
    assert_eq!(u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]), SNAPSHOT_VERSION);
    insta::assert_snapshot!("meta_snapshot_v2", hex_dump(&bytes));
}

/// A snapshot written by version 1 (before access keys) still restores: same namespace,
/// no access keys; written again it becomes version 2.
#[test]
fn snapshot_v1_still_decodes_and_migrates() {
    let v1 = from_hex_dump(include_str!("fixtures/meta_snapshot_v1.hex"));
    assert_eq!(u32::from_le_bytes([v1[4], v1[5], v1[6], v1[7]]), 1);
    let s = MetaState::decode_snapshot(&v1).expect("v1 decodes");
    assert_eq!(s, fixed_state());
    assert!(s.access_keys.is_empty());
    let again = s.encode_snapshot();
    assert_eq!(u32::from_le_bytes([again[4], again[5], again[6], again[7]]), 2);
    assert_eq!(MetaState::decode_snapshot(&again).expect("v2 decodes"), s);
    // A version 2 payload labelled version 1 is refused, never misread.
    let v2 = fixed_state_v2().encode_snapshot();
    assert!(MetaState::decode_snapshot(&reheader(&v2, 1)).is_err());
}

#[test]
fn snapshot_round_trips_through_the_state_machine_trait() {
    let s = fixed_state_v2();
    let bytes = StateMachine::snapshot(&s);
    let back = <MetaState as StateMachine>::restore(&bytes).expect("restore");
    assert_eq!(back, s);
    assert_eq!(back.resolve(b"/ckpt/step-1").expect("resolve").xattrs.len(), 2);
    let ids: Vec<&str> = back.access_keys.keys().map(String::as_str).collect();
    assert_eq!(ids, ["TPBBBBBBBBBBBBBBBBBB", "TPCCCCCCCCCCCCCCCCCC"]);
}

fn reheader(bytes: &[u8], version: u32) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[4..8].copy_from_slice(&version.to_le_bytes());
    out
}

#[test]
fn malformed_snapshots_are_clear_errors() {
    let bytes = fixed_state_v2().encode_snapshot();
    let err = |b: &[u8]| MetaState::decode_snapshot(b).expect_err("must not decode");
    assert_eq!(err(&reheader(&bytes, 3)), "unsupported meta snapshot version found=3 supported=1..=2");
    assert_eq!(err(&reheader(&bytes, 0)), "unsupported meta snapshot version found=0 supported=1..=2");
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
    let mut s = fixed_state_v2();
    s.blocks.get_mut(&1).expect("block 1").refs = 7;
    let bytes = s.encode_snapshot();
    let e = MetaState::decode_snapshot(&bytes).expect_err("refs mismatch");
    assert_eq!(e, "meta snapshot inconsistent: block refs wrong block_id=1 refs=7 extents=2");
    let mut s = fixed_state_v2();
    s.access_keys.insert("lowercase-id-is-not-valid".into(), s.access_keys["TPBBBBBBBBBBBBBBBBBB"].clone());
    let e = MetaState::decode_snapshot(&s.encode_snapshot()).expect_err("bad key id");
    assert!(e.starts_with("meta snapshot inconsistent: bad access key id=\"lowercase-id-is-not-valid\""), "{e}");
}
