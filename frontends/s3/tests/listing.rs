//! Listing in S3 key order over a real directory tree, checked against a model: the sorted
//! list of keys with S3's prefix / start-after / delimiter / max-keys rules applied to it.

mod common;

use std::collections::BTreeSet;

use tidepool_fs::{Fs, ROOT_INO};
use tidepool_s3::list::{Item, ListQuery, list};

/// Create `keys` (files, or folder markers for keys ending in '/') below bucket `b`.
async fn make(fs: &Fs, keys: &[&str]) -> u64 {
    let bucket = fs.mkdir(ROOT_INO, b"b", 0o755, 0, 0).await.unwrap().ino;
    for k in keys {
        let path = format!("/b/{k}");
        if let Some(dir) = k.strip_suffix('/') {
            let d = fs.mkdir_all(format!("/b/{dir}").as_bytes(), 0o755).await.unwrap();
            fs.set_xattr(d.ino, ":etag", "d41d8cd98f00b204e9800998ecf8427e").await.unwrap();
            continue;
        }
        let (parent, name) = path.rsplit_once('/').unwrap();
        let p = fs.mkdir_all(parent.as_bytes(), 0o755).await.unwrap();
        fs.create(p.ino, name.as_bytes(), 0o644, 0, 0).await.unwrap();
    }
    bucket
}

/// S3's answer, computed from the sorted keys.
fn model(
    keys: &BTreeSet<Vec<u8>>,
    prefix: &[u8],
    delim: Option<&[u8]>,
    after: Option<&[u8]>,
    max: usize,
) -> (Vec<Item>, bool) {
    let cp_of = |k: &[u8]| -> Option<Vec<u8>> {
        let d = delim?;
        let rest = &k[prefix.len()..];
        let i = rest.windows(d.len()).position(|w| w == d)?;
        Some(k[..prefix.len() + i + d.len()].to_vec())
    };
    let mut out: Vec<Item> = Vec::new();
    for k in keys {
        if !k.starts_with(prefix) || after.is_some_and(|a| k.as_slice() <= a) {
            continue;
        }
        match cp_of(k) {
            // A start-after that is itself a common prefix skips every key it holds.
            Some(cp) if after == Some(cp.as_slice()) => continue,
            Some(cp) => {
                if !matches!(out.last(), Some(Item::Prefix(p)) if *p == cp) {
                    out.push(Item::Prefix(cp));
                }
            }
            None => out.push(Item::Object { key: k.clone(), attr: dummy(), etag: String::new() }),
        }
    }
    let truncated = out.len() > max;
    out.truncate(max);
    (out, truncated)
}

fn dummy() -> tidepool_fs::FileAttr {
    tidepool_fs::FileAttr {
        ino: 0,
        generation: 0,
        kind: tidepool_fs::InodeKind::File,
        mode: 0,
        uid: 0,
        gid: 0,
        size: 0,
        nlink: 0,
        parent: 0,
        atime: 0,
        mtime: 0,
        ctime: 0,
    }
}

fn keys_of(items: &[Item]) -> Vec<String> {
    items
        .iter()
        .map(|i| match i {
            Item::Object { key, .. } => String::from_utf8_lossy(key).into_owned(),
            Item::Prefix(p) => format!("[{}]", String::from_utf8_lossy(p)),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_follows_s3_key_order_and_matches_the_model() {
    let e = common::fs_env().await;
    let keys = [
        "a-b", "a/b", "a/c/d", "a/c-d", "a/c.e/f", "a0", "a.", "bb", "b/", "b/x", "c/", "c d/e", "c!", "c/e",
        "d/e/f/g", "d/e-f", "d/e/f-", "d/e0", "é/x", "z", "zz/a b", "zz/a/b", "zz/a-b", "zz/a0",
    ];
    let bucket = make(&e.fs, &keys).await;
    let set: BTreeSet<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();

    // Everything, in byte order of the full keys.
    let q = ListQuery { prefix: b"", delimiter: None, after: None, max_keys: 1000 };
    let got = list(&e.fs, bucket, &q).unwrap();
    let want: Vec<String> = set.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    assert_eq!(keys_of(&got.items), want);
    assert!(!got.truncated);

    // Every combination of prefix, delimiter and start-after, in pages of every size.
    let mut bounds: Vec<Vec<u8>> = set.iter().cloned().collect();
    bounds.extend([b"".to_vec(), b"a".to_vec(), b"a/".to_vec(), b"a/c".to_vec(), b"c".to_vec(), b"zz/a".to_vec()]);
    let prefixes: [&[u8]; 9] = [b"", b"a", b"a/", b"a/c", b"c", b"d/e", b"d/e/", b"zz/a", b"nothing"];
    let delims: [Option<&[u8]>; 4] = [None, Some(b"/"), Some(b"-"), Some(b"e/")];
    let mut checked = 0;
    for prefix in prefixes {
        for delim in delims {
            for after in bounds.iter().map(|b| Some(b.as_slice())).chain([None]) {
                for max in [1, 2, 3, 1000] {
                    let q = ListQuery { prefix, delimiter: delim, after: after.map(<[u8]>::to_vec), max_keys: max };
                    let got = list(&e.fs, bucket, &q).unwrap();
                    let (want, truncated) = model(&set, prefix, delim, after, max);
                    let ctx = format!(
                        "prefix={:?} delim={:?} after={:?} max={max}",
                        String::from_utf8_lossy(prefix),
                        delim.map(String::from_utf8_lossy),
                        after.map(String::from_utf8_lossy)
                    );
                    assert_eq!(keys_of(&got.items), keys_of(&want), "{ctx}");
                    assert_eq!(got.truncated, truncated, "{ctx}");
                    checked += 1;
                }
            }
        }
    }
    // Paging with next_after walks the whole listing once.
    for delim in delims {
        let mut after = None;
        let mut all = Vec::new();
        loop {
            let q = ListQuery { prefix: b"", delimiter: delim, after: after.clone(), max_keys: 2 };
            let page = list(&e.fs, bucket, &q).unwrap();
            all.extend(keys_of(&page.items));
            if !page.truncated {
                break;
            }
            after = page.next_after();
        }
        assert_eq!(all, keys_of(&model(&set, b"", delim, None, 1000).0), "paging with {delim:?}");
    }
    assert!(checked > 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_folders_are_not_listed() {
    let e = common::fs_env().await;
    let bucket = make(&e.fs, &["x/y"]).await;
    e.fs.mkdir_all(b"/b/empty/deeper", 0o755).await.unwrap();
    let q = ListQuery { prefix: b"", delimiter: Some(b"/"), after: None, max_keys: 1000 };
    assert_eq!(keys_of(&list(&e.fs, bucket, &q).unwrap().items), vec!["[x/]"]);
    let q = ListQuery { prefix: b"", delimiter: None, after: None, max_keys: 1000 };
    assert_eq!(keys_of(&list(&e.fs, bucket, &q).unwrap().items), vec!["x/y"]);
}
