//! Unit tests of `apply`: one per error case, plus the small behaviours (POSIX rename
//! corners, truncate splitting, freed blocks) that the property tests only hit by chance.

use super::*;

fn create(s: &mut MetaState, parent: Ino, name: &str, kind: NewKind) -> Result<Applied, MetaError> {
    s.apply(&Command::Create { parent, name: name.into(), kind, mode: 0o100644, uid: 7, gid: 8, now: 5 })
}

fn file(s: &mut MetaState, parent: Ino, name: &str) -> Ino {
    create(s, parent, name, NewKind::File).expect("create file").attr.expect("attr").ino
}

fn dir(s: &mut MetaState, parent: Ino, name: &str) -> Ino {
    create(s, parent, name, NewKind::Dir).expect("create dir").attr.expect("attr").ino
}

fn rename(s: &mut MetaState, sp: Ino, sn: &str, dp: Ino, dn: &str) -> Result<Applied, MetaError> {
    s.apply(&Command::Rename { src_parent: sp, src_name: sn.into(), dst_parent: dp, dst_name: dn.into(), now: 9 })
}

fn alloc(s: &mut MetaState, count: u64) -> BlockId {
    s.apply(&Command::AllocBlockIds { count }).expect("alloc").first_block_id.expect("first id")
}

fn write(s: &mut MetaState, ino: Ino, offset: u64, blocks: &[(BlockId, u32)]) -> Result<Applied, MetaError> {
    let blocks = blocks.iter().map(|&(id, len)| NewBlock { id, len }).collect();
    s.apply(&Command::Write { ino, offset, blocks, now: 11 })
}

fn size(s: &mut MetaState, ino: Ino, size: u64) -> Result<Applied, MetaError> {
    s.apply(&Command::SetAttr {
        ino,
        mode: None,
        uid: None,
        gid: None,
        size: Some(size),
        atime: None,
        mtime: None,
        now: 12,
    })
}

/// Applies `cmd`, expects `err`, and checks nothing but `applied` changed.
fn fails(s: &mut MetaState, cmd: Command, err: MetaError) {
    let mut before = s.clone();
    assert_eq!(s.apply(&cmd), Err(err), "{cmd:?}");
    before.applied += 1;
    assert_eq!(*s, before, "failed command changed the state: {cmd:?}");
}

fn unlink(parent: Ino, name: &str) -> Command {
    Command::Unlink { parent, name: name.into(), now: 3 }
}

#[test]
fn new_state_is_just_the_root() {
    let s = MetaState::new();
    let root = s.inode(ROOT_INO).expect("root");
    assert_eq!((root.attr.mode, root.attr.nlink, root.attr.parent, root.attr.size), (0o755, 2, ROOT_INO, 0));
    assert_eq!((s.next_ino, s.next_block_id, s.applied), (2, 1, 0));
    assert_eq!(s, MetaState::default());
    s.check_invariants().expect("invariants");
}

#[test]
fn create_sets_attrs_and_parent_counts() {
    let mut s = MetaState::new();
    s.apply(&Command::AllocBlockIds { count: 1 }).expect("alloc");
    let a = create(&mut s, ROOT_INO, "d", NewKind::Dir).expect("mkdir").attr.expect("attr");
    assert_eq!((a.ino, a.generation, a.mode, a.nlink, a.parent, a.mtime), (2, 2, 0o644, 2, ROOT_INO, 5));
    let root = &s.inode(ROOT_INO).expect("root").attr;
    assert_eq!((root.nlink, root.size, root.mtime, root.ctime), (3, 1, 5, 5));
    let l = create(&mut s, a.ino, "l", NewKind::Symlink { target: b"../x".to_vec() }).expect("symlink");
    assert_eq!(l.attr.expect("attr").size, 4);
    assert_eq!(s.resolve(b"/d/l").expect("resolve").target, b"../x");
    s.check_invariants().expect("invariants");
}

#[test]
fn name_errors() {
    let mut s = MetaState::new();
    for bad in ["", ".", "..", "a/b", "a\0b"] {
        fails(&mut s, unlink(ROOT_INO, bad), MetaError::InvalidName(bad.into()));
        let cmd = Command::Create { parent: 1, name: bad.into(), kind: NewKind::File, mode: 0, uid: 0, gid: 0, now: 0 };
        fails(&mut s, cmd, MetaError::InvalidName(bad.into()));
    }
    let long = "x".repeat(NAME_MAX + 1);
    let cmd = Command::Create { parent: 1, name: long.into(), kind: NewKind::File, mode: 0, uid: 0, gid: 0, now: 0 };
    fails(&mut s, cmd, MetaError::NameTooLong(NAME_MAX + 1));
    assert!(create(&mut s, ROOT_INO, &"y".repeat(NAME_MAX), NewKind::File).is_ok());
}

#[test]
fn create_errors() {
    let mut s = MetaState::new();
    let f = file(&mut s, ROOT_INO, "f");
    let mk =
        |parent, name: &str, kind| Command::Create { parent, name: name.into(), kind, mode: 0, uid: 0, gid: 0, now: 0 };
    fails(&mut s, mk(ROOT_INO, "f", NewKind::Dir), MetaError::Exists { parent: 1, name: "f".into() });
    fails(&mut s, mk(99, "g", NewKind::File), MetaError::NoInode(99));
    fails(&mut s, mk(f, "g", NewKind::File), MetaError::NotDir(f));
    fails(&mut s, mk(1, "l", NewKind::Symlink { target: vec![] }), MetaError::Invalid("empty symlink target"));
    let long = NewKind::Symlink { target: vec![b'a'; SYMLINK_MAX + 1] };
    fails(&mut s, mk(1, "l", long), MetaError::Invalid("symlink target longer than 4096 bytes"));
}

#[test]
fn unlink_and_rmdir_errors() {
    let mut s = MetaState::new();
    let d = dir(&mut s, ROOT_INO, "d");
    let f = file(&mut s, d, "f");
    fails(&mut s, unlink(ROOT_INO, "nope"), MetaError::NoEntry { parent: 1, name: "nope".into() });
    fails(&mut s, unlink(ROOT_INO, "d"), MetaError::IsDir(d));
    fails(&mut s, unlink(f, "x"), MetaError::NotDir(f));
    let rmdir = |parent, name: &str| Command::Rmdir { parent, name: name.into(), now: 4 };
    fails(&mut s, rmdir(d, "f"), MetaError::NotDir(f));
    fails(&mut s, rmdir(ROOT_INO, "d"), MetaError::NotEmpty(d));
    fails(&mut s, rmdir(ROOT_INO, "."), MetaError::InvalidName(".".into()));
    s.apply(&unlink(d, "f")).expect("unlink");
    s.apply(&rmdir(ROOT_INO, "d")).expect("rmdir");
    assert_eq!(s, {
        let mut e = MetaState::new();
        e.applied = s.applied;
        e.next_ino = 4;
        fix_root_times(&mut e, &s);
        e
    });
}

fn fix_root_times(e: &mut MetaState, s: &MetaState) {
    let root = &s.inodes[&ROOT_INO].attr;
    let a = &mut e.inodes.get_mut(&ROOT_INO).expect("root").attr;
    (a.mtime, a.ctime) = (root.mtime, root.ctime);
}

#[test]
fn rename_errors() {
    let mut s = MetaState::new();
    let a = dir(&mut s, ROOT_INO, "a");
    let b = dir(&mut s, a, "b");
    let f = file(&mut s, ROOT_INO, "f");
    let _ = file(&mut s, b, "g");
    let cmd = |sp, sn: &str, dp, dn: &str| Command::Rename {
        src_parent: sp,
        src_name: sn.into(),
        dst_parent: dp,
        dst_name: dn.into(),
        now: 9,
    };
    fails(&mut s, cmd(1, "zz", 1, "y"), MetaError::NoEntry { parent: 1, name: "zz".into() });
    fails(&mut s, cmd(1, "a", 1, "f"), MetaError::NotDir(f));
    fails(&mut s, cmd(1, "f", a, "b"), MetaError::IsDir(b));
    fails(&mut s, cmd(1, "a", b, "x"), MetaError::Invalid("cannot move a directory into its own subtree"));
    fails(&mut s, cmd(1, "a", a, "x"), MetaError::Invalid("cannot move a directory into its own subtree"));
    let e = dir(&mut s, ROOT_INO, "e");
    fails(&mut s, cmd(1, "e", 1, "a"), MetaError::NotEmpty(a));
    fails(&mut s, cmd(1, "e", 1, ".."), MetaError::InvalidName("..".into()));
    fails(&mut s, cmd(99, "e", 1, "x"), MetaError::NoInode(99));
    fails(&mut s, cmd(1, "e", f, "x"), MetaError::NotDir(f));
    let _ = e;
}

#[test]
fn rename_moves_and_replaces() {
    let mut s = MetaState::new();
    let a = dir(&mut s, ROOT_INO, "a");
    let b = dir(&mut s, ROOT_INO, "b");
    let f = file(&mut s, a, "f");
    let g = file(&mut s, b, "g");
    let id = alloc(&mut s, 2);
    write(&mut s, g, 0, &[(id, 100)]).expect("write");
    // Same inode: a no-op.
    let before = s.clone();
    assert_eq!(rename(&mut s, a, "f", a, "f").expect("noop").attr.expect("attr").ino, f);
    assert_eq!(s.inodes, before.inodes);
    // Over an existing file: its blocks are freed.
    let out = rename(&mut s, a, "f", b, "g").expect("rename");
    assert_eq!((out.freed, out.attr.expect("attr").parent), (vec![id], b));
    assert!(s.inode(g).is_none() && s.blocks.is_empty());
    // A dir across dirs, over an empty dir: nlinks follow.
    let c = dir(&mut s, a, "c");
    let _empty = dir(&mut s, b, "e");
    rename(&mut s, a, "c", b, "e").expect("rename dir");
    assert_eq!((s.inodes[&a].attr.nlink, s.inodes[&b].attr.nlink, s.inodes[&c].attr.parent), (2, 3, b));
    assert_eq!(s.resolve(b"/b/e").expect("resolve").attr.ino, c);
    assert_eq!((s.inodes[&a].attr.size, s.inodes[&b].attr.size), (0, 2));
    s.check_invariants().expect("invariants");
}

#[test]
fn write_errors() {
    let mut s = MetaState::new();
    let d = dir(&mut s, ROOT_INO, "d");
    let f = file(&mut s, ROOT_INO, "f");
    let l = create(&mut s, 1, "l", NewKind::Symlink { target: b"t".to_vec() }).expect("ln").attr.expect("attr").ino;
    let id = alloc(&mut s, 4);
    let w = |ino, offset, blocks: &[(u64, u32)]| Command::Write {
        ino,
        offset,
        blocks: blocks.iter().map(|&(id, len)| NewBlock { id, len }).collect(),
        now: 1,
    };
    fails(&mut s, w(99, 0, &[(id, 1)]), MetaError::NoInode(99));
    fails(&mut s, w(d, 0, &[(id, 1)]), MetaError::IsDir(d));
    fails(&mut s, w(l, 0, &[(id, 1)]), MetaError::Invalid("cannot write to a symlink"));
    fails(&mut s, w(f, 0, &[]), MetaError::Invalid("write without blocks"));
    fails(&mut s, w(f, 0, &[(id, 0)]), MetaError::Invalid("empty block"));
    fails(&mut s, w(f, 0, &[(0, 1)]), MetaError::Invalid("block id not allocated"));
    fails(&mut s, w(f, 0, &[(id + 4, 1)]), MetaError::Invalid("block id not allocated"));
    fails(&mut s, w(f, 0, &[(id, 1), (id, 1)]), MetaError::Invalid("block id already used"));
    fails(&mut s, w(f, u64::MAX, &[(id, 1)]), MetaError::Invalid("write ends beyond 2^63"));
    fails(&mut s, w(f, MAX_FILE_SIZE, &[(id, 1)]), MetaError::Invalid("write ends beyond 2^63"));
    s.apply(&w(f, MAX_FILE_SIZE - 1, &[(id, 1)])).expect("write at the last byte");
    fails(&mut s, w(f, 0, &[(id, 1)]), MetaError::Invalid("block id already used"));
    s.check_invariants().expect("invariants");
}

#[test]
fn overwrite_splits_and_truncate_frees() {
    let mut s = MetaState::new();
    let f = file(&mut s, ROOT_INO, "f");
    let id = alloc(&mut s, 3);
    write(&mut s, f, 0, &[(id, 100)]).expect("write");
    write(&mut s, f, 40, &[(id + 1, 10)]).expect("overwrite middle");
    assert_eq!(s.blocks[&id].refs, 2);
    let ext = s.extents_in(f, 0, 100).expect("extents");
    let want = vec![
        (0, Extent { len: 40, block: id, block_offset: 0 }),
        (40, Extent { len: 10, block: id + 1, block_offset: 0 }),
        (50, Extent { len: 50, block: id, block_offset: 50 }),
    ];
    assert_eq!(ext, want);
    assert_eq!(s.extents_in(f, 45, 10).expect("clip")[1], (50, Extent { len: 5, block: id, block_offset: 50 }));
    assert_eq!(size(&mut s, f, 45).expect("truncate").freed, Vec::<u64>::new());
    assert_eq!(s.blocks[&id].refs, 1);
    assert_eq!(size(&mut s, f, 30).expect("truncate").freed, vec![id + 1]);
    assert_eq!(size(&mut s, f, 1000).expect("extend").attr.expect("attr").size, 1000);
    assert_eq!(size(&mut s, f, 0).expect("truncate").freed, vec![id]);
    write(&mut s, f, 10, &[(id + 2, 5)]).expect("write into hole");
    assert_eq!(s.inodes[&f].attr.size, 15);
    let d = s.inodes[&ROOT_INO].attr.ino;
    fails(
        &mut s,
        Command::SetAttr { ino: d, mode: None, uid: None, gid: None, size: Some(0), atime: None, mtime: None, now: 0 },
        MetaError::IsDir(d),
    );
    s.check_invariants().expect("invariants");
}

#[test]
fn xattr_alloc_and_block_state_errors() {
    let mut s = MetaState::new();
    let f = file(&mut s, ROOT_INO, "f");
    let set = |ino, key: String, value: String| Command::SetXattr { ino, key, value, now: 2 };
    fails(&mut s, set(f, String::new(), "v".into()), MetaError::Invalid("empty user metadata key"));
    fails(
        &mut s,
        set(f, "k".repeat(XATTR_KEY_MAX + 1), "v".into()),
        MetaError::Invalid("user metadata key longer than 1024 bytes"),
    );
    fails(
        &mut s,
        set(f, "k".into(), "v".repeat(XATTR_VALUE_MAX + 1)),
        MetaError::Invalid("user metadata value longer than 64 KiB"),
    );
    fails(&mut s, set(99, "k".into(), "v".into()), MetaError::NoInode(99));
    s.apply(&set(f, "dataset".into(), "train".into())).expect("set");
    let out = s.apply(&Command::RemoveXattr { ino: f, key: "missing".into(), now: 77 }).expect("remove missing");
    assert_eq!(out.attr.expect("attr").ctime, 77);
    assert_eq!(s.inodes[&f].xattrs.len(), 1);
    let bad = BTreeMap::from([("ok".to_string(), "v".to_string()), (String::new(), "v".to_string())]);
    fails(
        &mut s,
        Command::ReplaceXattrs { ino: f, xattrs: bad, now: 1 },
        MetaError::Invalid("empty user metadata key"),
    );
    fails(&mut s, Command::AllocBlockIds { count: 0 }, MetaError::Invalid("block id count outside 1..=2^20"));
    fails(
        &mut s,
        Command::AllocBlockIds { count: ALLOC_MAX + 1 },
        MetaError::Invalid("block id count outside 1..=2^20"),
    );
    assert_eq!(alloc(&mut s, ALLOC_MAX), 1);
    assert_eq!(alloc(&mut s, 1), ALLOC_MAX + 1);
    fails(&mut s, Command::SetPin { ino: 999, pinned: true }, MetaError::NoInode(999));
}

#[test]
fn read_helpers() {
    let mut s = MetaState::new();
    let d = dir(&mut s, ROOT_INO, "d");
    for n in ["c", "a", "b"] {
        file(&mut s, d, n);
    }
    let (page, eof) = s.readdir(d, None, 2).expect("readdir");
    assert_eq!((page.iter().map(|(n, _)| n.as_slice()).collect::<Vec<_>>(), eof), (vec![&b"a"[..], b"b"], false));
    let (page, eof) = s.readdir(d, Some(b"b"), 2).expect("readdir");
    assert_eq!((page.len(), eof), (1, true));
    assert_eq!(s.lookup(d, b"..").expect("dotdot").attr.ino, ROOT_INO);
    assert_eq!(s.lookup(d, b"zz"), Err(MetaError::NoEntry { parent: d, name: "zz".into() }));
    let a = s.resolve(b"/d/a").expect("resolve").attr.ino;
    assert_eq!(s.resolve(b"/d/a/x").map(|_| ()), Err(MetaError::NotDir(a)));
    assert_eq!(s.resolve(b"/").expect("root").attr.ino, ROOT_INO);
    let t = s.totals();
    assert_eq!((t.files, t.dirs, t.symlinks, t.bytes, t.blocks), (3, 2, 0, 0, 0));
}

#[test]
fn set_attr_errors_and_block_state() {
    let mut s = MetaState::new();
    let l = create(&mut s, 1, "l", NewKind::Symlink { target: b"t".to_vec() }).expect("ln").attr.expect("attr").ino;
    let sa = |ino, size| Command::SetAttr {
        ino,
        mode: Some(0o4755),
        uid: None,
        gid: None,
        size,
        atime: None,
        mtime: None,
        now: 6,
    };
    fails(&mut s, sa(99, None), MetaError::NoInode(99));
    fails(&mut s, sa(l, Some(0)), MetaError::Invalid("cannot set the size of a symlink"));
    let f = file(&mut s, ROOT_INO, "f");
    fails(&mut s, sa(f, Some(MAX_FILE_SIZE + 1)), MetaError::Invalid("size larger than 2^63"));
    let a = s.apply(&sa(l, None)).expect("chmod symlink").attr.expect("attr");
    assert_eq!((a.mode, a.ctime), (0o4755, 6));
    let id = alloc(&mut s, 1);
    write(&mut s, f, 0, &[(id, 10)]).expect("write");
    let tb = TieredBlock { id, offset: 0, len: 10, crc: 1 };
    let rec = |object, blocks: Vec<TieredBlock>, from| Command::RecordTiered {
        object,
        kind: ObjectKind::Chunk,
        size_bytes: 100,
        blocks,
        from,
        now: 7,
    };
    assert_eq!(s.dirty_bytes, 10);
    assert_eq!(s.apply(&rec(5, vec![tb], None)).expect("record").tiered, 1);
    assert_eq!(s.blocks[&id].state, BlockState::Tiered(ObjectLocator { object: 5, offset: 0, len: 10, crc: 1 }));
    assert_eq!((s.dirty_bytes, s.objects[&5].live_bytes, s.objects[&5].live_blocks), (0, 10, 1));
    fails(&mut s, rec(5, vec![], None), MetaError::Invalid("object already recorded"));
    fails(&mut s, rec(6, vec![tb, tb], None), MetaError::Invalid("block listed twice in one object"));
    let far = TieredBlock { offset: 95, ..tb };
    fails(&mut s, rec(6, vec![far], None), MetaError::Invalid("tiered block outside its object"));
    // A second first-upload of the same block does not take (it is no longer dirty) ...
    assert_eq!(s.apply(&rec(6, vec![tb], None)).expect("record").tiered, 0);
    assert_eq!(s.objects[&6].live_blocks, 0);
    // ... but a rewrite from its object does, and empties the old object.
    assert_eq!(s.apply(&rec(7, vec![TieredBlock { offset: 50, ..tb }], Some(5))).expect("rewrite").tiered, 1);
    assert_eq!((s.objects[&5].live_blocks, s.objects[&7].live_bytes), (0, 10));
    fails(&mut s, Command::DropObjects { objects: vec![5, 7] }, MetaError::Invalid("object still has live blocks"));
    s.apply(&Command::DropObjects { objects: vec![5, 6, 1234] }).expect("drop");
    assert_eq!(s.objects.keys().copied().collect::<Vec<_>>(), vec![7]);
    // A manifest keeps the objects it points into: an emptied one stays until it ages out.
    let keep = |epoch, oldest_retained, objects: &[u128]| Command::KeepObjects {
        epoch,
        oldest_retained,
        objects: objects.to_vec(),
    };
    s.apply(&keep(3, 1, &[7])).expect("keep");
    fails(&mut s, keep(3, 1, &[7]), MetaError::Invalid("manifest epochs must grow"));
    s.apply(&rec(8, vec![TieredBlock { offset: 0, ..tb }], Some(7))).expect("rewrite");
    fails(&mut s, Command::DropObjects { objects: vec![7] }, MetaError::Invalid("object kept by a retained manifest"));
    s.apply(&keep(5, 3, &[8, 99])).expect("keep");
    assert_eq!((s.objects[&7].kept_epoch, s.objects[&8].kept_epoch), (Some(3), Some(5)));
    fails(&mut s, Command::DropObjects { objects: vec![7] }, MetaError::Invalid("object kept by a retained manifest"));
    s.apply(&keep(6, 4, &[8])).expect("keep");
    s.apply(&Command::DropObjects { objects: vec![7] }).expect("drop once no retained manifest keeps it");
    s.apply(&Command::SetPin { ino: f, pinned: true }).expect("pin");
    assert!(s.is_pinned(f) && !s.is_pinned(ROOT_INO));
    s.check_invariants().expect("invariants");
    assert_eq!(s.apply(&unlink(ROOT_INO, "f")).expect("unlink").freed, vec![id]);
    assert_eq!((s.objects[&8].live_blocks, s.objects[&8].live_bytes), (0, 0));
    assert!(s.pins.is_empty(), "a removed inode's pin goes with it");
    s.check_invariants().expect("invariants");
}

fn concat(dst: Ino, srcs: &[Ino]) -> Command {
    Command::Concat { dst, srcs: srcs.to_vec(), now: 21 }
}

#[test]
fn concat_errors() {
    let mut s = MetaState::new();
    let d = dir(&mut s, ROOT_INO, "d");
    let f = file(&mut s, ROOT_INO, "f");
    let g = file(&mut s, d, "g");
    let l = create(&mut s, 1, "l", NewKind::Symlink { target: b"t".to_vec() }).expect("ln").attr.expect("attr").ino;
    fails(&mut s, concat(99, &[g]), MetaError::NoInode(99));
    fails(&mut s, concat(d, &[g]), MetaError::IsDir(d));
    fails(&mut s, concat(l, &[g]), MetaError::Invalid("cannot concat into a symlink"));
    fails(&mut s, concat(f, &[]), MetaError::Invalid("concat without sources"));
    fails(&mut s, concat(f, &[g, 99]), MetaError::NoInode(99));
    fails(&mut s, concat(f, &[g, d]), MetaError::IsDir(d));
    fails(&mut s, concat(f, &[l]), MetaError::Invalid("cannot concat a symlink"));
    let distinct = MetaError::Invalid("concat sources must be distinct and differ from the destination");
    fails(&mut s, concat(f, &[g, g]), distinct.clone());
    fails(&mut s, concat(f, &[f]), distinct);
    size(&mut s, f, MAX_FILE_SIZE - 5).expect("extend");
    size(&mut s, g, 6).expect("extend");
    fails(&mut s, concat(f, &[g]), MetaError::Invalid("concat ends beyond 2^63"));
    size(&mut s, g, 5).expect("shrink");
    s.apply(&concat(f, &[g])).expect("concat up to the largest size");
    assert_eq!(s.inodes[&f].attr.size, MAX_FILE_SIZE);
    s.check_invariants().expect("invariants");
}

#[test]
fn concat_moves_extents_without_copying() {
    let mut s = MetaState::new();
    let up = dir(&mut s, ROOT_INO, "up");
    let other = dir(&mut s, ROOT_INO, "other");
    let dst = file(&mut s, ROOT_INO, "dst");
    let p1 = file(&mut s, up, "1");
    let p2 = file(&mut s, up, "2");
    let p3 = file(&mut s, other, "3");
    let keep = file(&mut s, up, "keep");
    let id = alloc(&mut s, 8);
    write(&mut s, dst, 0, &[(id, 10)]).expect("write dst");
    write(&mut s, p1, 0, &[(id + 1, 100), (id + 2, 50)]).expect("write p1");
    write(&mut s, p2, 20, &[(id + 3, 30)]).expect("write p2 after a hole");
    size(&mut s, p2, 60).expect("p2 ends in a hole");
    write(&mut s, p3, 0, &[(id + 4, 40)]).expect("write p3");
    write(&mut s, keep, 0, &[(id + 5, 8)]).expect("write keep");
    let refs_before: BTreeMap<BlockId, u32> = s.blocks.iter().map(|(k, b)| (*k, b.refs)).collect();
    let out = s.apply(&concat(dst, &[p2, p1, p3])).expect("concat");
    let a = out.attr.expect("attr");
    assert_eq!((a.ino, a.size, a.mtime, a.ctime), (dst, 10 + 60 + 150 + 40, 21, 21));
    assert!(out.freed.is_empty());
    let refs_after: BTreeMap<BlockId, u32> = s.blocks.iter().map(|(k, b)| (*k, b.refs)).collect();
    assert_eq!(refs_before, refs_after, "blocks move, their counts stay");
    let want = vec![
        (0, Extent { len: 10, block: id, block_offset: 0 }),
        (30, Extent { len: 30, block: id + 3, block_offset: 0 }),
        (70, Extent { len: 100, block: id + 1, block_offset: 0 }),
        (170, Extent { len: 50, block: id + 2, block_offset: 0 }),
        (220, Extent { len: 40, block: id + 4, block_offset: 0 }),
    ];
    assert_eq!(s.extents_in(dst, 0, 260).expect("extents"), want);
    for p in [p1, p2, p3] {
        assert!(s.inode(p).is_none(), "source {p} removed");
    }
    assert_eq!(s.readdir(up, None, 10).expect("readdir").0.len(), 1, "only `keep` is left");
    assert_eq!((s.inodes[&up].attr.size, s.inodes[&up].attr.mtime), (1, 21));
    assert_eq!(s.inodes[&other].attr.size, 0);
    s.check_invariants().expect("invariants");
    // The moved blocks are freed when the destination goes.
    let mut freed = s.apply(&unlink(ROOT_INO, "dst")).expect("unlink").freed;
    freed.sort_unstable();
    assert_eq!(freed, vec![id, id + 1, id + 2, id + 3, id + 4]);
    s.check_invariants().expect("invariants");
}

fn publish(parent: Ino, name: &str, blocks: &[(BlockId, u32)], xattrs: &[(&str, &str)]) -> Command {
    Command::Publish {
        parent,
        name: name.into(),
        blocks: blocks.iter().map(|&(id, len)| NewBlock { id, len }).collect(),
        xattrs: xattrs.iter().map(|&(k, v)| (k.to_string(), v.to_string())).collect(),
        mode: 0o100640,
        uid: 3,
        gid: 4,
        now: 21,
    }
}

#[test]
fn publish_creates_a_file_with_exact_blocks_and_xattrs() {
    let mut s = MetaState::new();
    let b = alloc(&mut s, 2);
    let cmd = publish(ROOT_INO, "o", &[(b, 100), (b + 1, 50)], &[("k", "v")]);
    let a = s.apply(&cmd).expect("publish").attr.expect("attr");
    assert_eq!(
        (a.kind, a.size, a.mode, a.uid, a.gid, a.nlink, a.parent),
        (InodeKind::File, 150, 0o640, 3, 4, 1, ROOT_INO)
    );
    assert_eq!((a.generation, a.mtime, a.ctime), (s.applied, 21, 21));
    let i = s.inode(a.ino).expect("inode");
    assert_eq!(i.xattrs, BTreeMap::from([("k".to_string(), "v".to_string())]));
    assert_eq!(i.extents.keys().copied().collect::<Vec<_>>(), vec![0, 100]);
    assert_eq!(s.lookup(ROOT_INO, b"o").expect("lookup").attr, a);
    let root = &s.inode(ROOT_INO).expect("root").attr;
    assert_eq!((root.size, root.nlink, root.mtime), (1, 2, 21));
    // No blocks: an empty file.
    let e = s.apply(&publish(ROOT_INO, "e", &[], &[])).expect("empty").attr.expect("attr");
    assert_eq!(e.size, 0);
    assert!(s.inode(e.ino).expect("inode").extents.is_empty());
    s.check_invariants().expect("invariants");
}

#[test]
fn publish_replaces_a_file_and_frees_its_blocks() {
    let mut s = MetaState::new();
    let b = alloc(&mut s, 4);
    let old = file(&mut s, ROOT_INO, "o");
    write(&mut s, old, 0, &[(b, 10), (b + 1, 10)]).expect("write");
    s.apply(&Command::SetXattr { ino: old, key: "old".into(), value: "1".into(), now: 1 }).expect("xattr");
    let other = file(&mut s, ROOT_INO, "other");
    write(&mut s, other, 0, &[(b + 2, 10)]).expect("write");
    let cmd = publish(ROOT_INO, "o", &[(b + 3, 7)], &[("new", "2")]);
    let applied = s.apply(&cmd).expect("publish");
    assert_eq!(applied.freed, vec![b, b + 1]);
    let a = applied.attr.expect("attr");
    assert_ne!(a.ino, old);
    assert!(s.inode(old).is_none());
    assert_eq!(a.size, 7);
    assert_eq!(s.lookup(ROOT_INO, b"o").expect("lookup").attr.ino, a.ino);
    assert_eq!(s.inode(a.ino).expect("inode").xattrs.keys().collect::<Vec<_>>(), vec!["new"]);
    assert!(s.blocks.contains_key(&(b + 2)) && s.blocks.contains_key(&(b + 3)));
    assert_eq!(s.inode(ROOT_INO).expect("root").attr.size, 2);
    s.check_invariants().expect("invariants");
}

#[test]
fn publish_errors_change_nothing() {
    let mut s = MetaState::new();
    let b = alloc(&mut s, 2);
    let d = dir(&mut s, ROOT_INO, "d");
    create(&mut s, ROOT_INO, "l", NewKind::Symlink { target: b"x".to_vec() }).expect("symlink");
    let f = file(&mut s, ROOT_INO, "f");
    write(&mut s, f, 0, &[(b, 10)]).expect("write");
    let c = publish(ROOT_INO, "d", &[(b + 1, 1)], &[]);
    fails(&mut s, c, MetaError::IsDir(d));
    let c = publish(ROOT_INO, "l", &[(b + 1, 1)], &[]);
    fails(&mut s, c, MetaError::Invalid("cannot publish over a symlink"));
    let c = publish(f, "x", &[(b + 1, 1)], &[]);
    fails(&mut s, c, MetaError::NotDir(f));
    let c = publish(999, "x", &[(b + 1, 1)], &[]);
    fails(&mut s, c, MetaError::NoInode(999));
    let c = publish(ROOT_INO, "a/b", &[(b + 1, 1)], &[]);
    fails(&mut s, c, MetaError::InvalidName("a/b".into()));
    // A block in use, an unallocated one, one twice, an empty one: the old file stays.
    let c = publish(ROOT_INO, "f", &[(b, 1)], &[]);
    fails(&mut s, c, MetaError::Invalid("block id already used"));
    let c = publish(ROOT_INO, "f", &[(b + 2, 1)], &[]);
    fails(&mut s, c, MetaError::Invalid("block id not allocated"));
    let c = publish(ROOT_INO, "f", &[(b + 1, 1), (b + 1, 1)], &[]);
    fails(&mut s, c, MetaError::Invalid("block id already used"));
    let c = publish(ROOT_INO, "f", &[(b + 1, 0)], &[]);
    fails(&mut s, c, MetaError::Invalid("empty block"));
    let c = publish(ROOT_INO, "f", &[(b + 1, 1)], &[("", "v")]);
    fails(&mut s, c, MetaError::Invalid("empty user metadata key"));
    let long = "v".repeat(XATTR_VALUE_MAX + 1);
    let c = publish(ROOT_INO, "f", &[(b + 1, 1)], &[("k", &long)]);
    fails(&mut s, c, MetaError::Invalid("user metadata value longer than 64 KiB"));
    assert_eq!(s.lookup(ROOT_INO, b"f").expect("lookup").attr.ino, f);
    s.check_invariants().expect("invariants");
}

#[test]
fn set_node_keeps_the_first_join_time_and_drop_node_removes_it() {
    let mut s = MetaState::new();
    let info = |addr: &str, joined| NodeInfo { addr: addr.into(), joined, ..NodeInfo::default() };
    s.apply(&Command::SetNode { id: 7, info: info("127.0.0.2:7100", 5) }).expect("set");
    s.apply(&Command::SetNode { id: 7, info: info("127.0.0.3:7100", 9) }).expect("replace");
    assert_eq!(s.nodes[&7], info("127.0.0.3:7100", 5));
    s.apply(&Command::DropNode { id: 7 }).expect("drop");
    s.apply(&Command::DropNode { id: 7 }).expect("dropping an absent node is fine");
    assert!(s.nodes.is_empty());
}
