//! Golden tests of the meta snapshot encoding: the bytes of a small fixed state are pinned
//! with insta (a change to them is a format change: bump `SNAPSHOT_VERSION` and migrate),
//! and every malformed input is a clear error.

use std::fmt::Write as _;

use tidepool_cluster::meta::{BlockState, Command, MetaState, NewBlock, NewKind, ObjectLocator, SNAPSHOT_VERSION};
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

fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in bytes.chunks(32).enumerate() {
        let hex: String = chunk.iter().map(|b| format!("{b:02x}")).collect();
        // Writing to a String cannot fail.
        writeln!(out, "{:04x}: {hex}", i * 32).expect("write to String");
    }
    out
}

#[test]
fn snapshot_v1_bytes_are_pinned() {
    let bytes = fixed_state().encode_snapshot();
    assert_eq!(&bytes[0..4], b"TPMS");
    assert_eq!(u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]), SNAPSHOT_VERSION);
    insta::assert_snapshot!("meta_snapshot_v1", hex_dump(&bytes));
}

#[test]
fn snapshot_round_trips_through_the_state_machine_trait() {
    let s = fixed_state();
    let bytes = StateMachine::snapshot(&s);
    let back = <MetaState as StateMachine>::restore(&bytes).expect("restore");
    assert_eq!(back, s);
    assert_eq!(back.resolve(b"/ckpt/step-1").expect("resolve").xattrs.len(), 2);
}

fn reheader(bytes: &[u8], version: u32) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[4..8].copy_from_slice(&version.to_le_bytes());
    out
}

#[test]
fn malformed_snapshots_are_clear_errors() {
    let bytes = fixed_state().encode_snapshot();
    let err = |b: &[u8]| MetaState::decode_snapshot(b).expect_err("must not decode");
    assert_eq!(err(&reheader(&bytes, 2)), "unsupported meta snapshot version found=2 supported=1");
    assert_eq!(err(&reheader(&bytes, 0)), "unsupported meta snapshot version found=0 supported=1");
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
    let mut s = fixed_state();
    s.blocks.get_mut(&1).expect("block 1").refs = 7;
    let bytes = s.encode_snapshot();
    let e = MetaState::decode_snapshot(&bytes).expect_err("refs mismatch");
    assert_eq!(e, "meta snapshot inconsistent: block refs wrong block_id=1 refs=7 extents=2");
}
