//! The `ObjectStore` conformance suite: what every backend (and every wrapper around one) must
//! do, written once and run against each. It works under a fresh random prefix, so the store
//! may be shared with other tests, and removes what it wrote at the end.
//!
//! The large object is 12 MiB and a bit: configure the backend under test with a multipart /
//! block threshold below that (S3: 5 MiB parts, a 6 MiB threshold) so it is cut into parts.

use std::sync::Arc;

use bytes::Bytes;
use tidepool_tiering::{ListPage, ObjectError, ObjectInfo, ObjectStore, PutIfAbsent};

/// Size of the object that must go up in parts.
pub const LARGE_BYTES: usize = 12 * 1024 * 1024 + 12_345;

/// Runs every check against `store`; panics on the first failure, naming it.
pub async fn run(store: Arc<dyn ObjectStore>) {
    let base = format!("conformance-{:016x}/", rand::random::<u64>());
    let s = store.as_ref();
    put_get_whole_and_ranged(s, &base).await;
    empty_object(s, &base).await;
    overwrite(s, &base).await;
    missing(s, &base).await;
    put_if_absent(s, &base).await;
    list_in_pages(s, &base).await;
    list_of_an_empty_prefix(s, &base).await;
    delete(s, &base).await;
    large_multipart(s, &base).await;
    unicode_and_spaces(s, &base).await;
    clean_up(s, &base).await;
}

/// A body whose every byte depends on its position and `seed`, so a misplaced part shows.
pub fn pattern(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    Bytes::from(data)
}

fn is_invalid<T: std::fmt::Debug>(r: &Result<T, ObjectError>) -> bool {
    matches!(r, Err(ObjectError::Invalid(_)))
}

async fn put_get_whole_and_ranged(s: &dyn ObjectStore, base: &str) {
    let key = format!("{base}basic/object.bin");
    let body = pattern(10_000, 1);
    s.put(&key, body.clone()).await.expect("put");
    assert_eq!(s.get(&key, None).await.expect("get whole"), body, "get whole");
    assert_eq!(s.get(&key, Some(0..10)).await.expect("get head range"), body.slice(0..10), "range at start");
    assert_eq!(s.get(&key, Some(1234..5678)).await.expect("get mid range"), body.slice(1234..5678), "range inside");
    assert_eq!(s.get(&key, Some(9_900..10_000)).await.expect("get end range"), body.slice(9_900..), "range at end");
    assert_eq!(s.get(&key, Some(9_999..10_000)).await.expect("get last byte"), body.slice(9_999..), "last byte");
    assert_eq!(s.get(&key, Some(0..10_000)).await.expect("get full range"), body, "range of the whole object");
    let past_end = s.get(&key, Some(9_990..10_001)).await;
    assert!(is_invalid(&past_end), "range running past the end: {past_end:?}");
    let beyond = s.get(&key, Some(10_005..10_010)).await;
    assert!(is_invalid(&beyond), "range starting past the end: {beyond:?}");
    let info = s.head(&key).await.expect("head");
    assert_eq!(info, Some(ObjectInfo { key: key.clone(), size_bytes: 10_000 }), "head");
}

async fn empty_object(s: &dyn ObjectStore, base: &str) {
    let key = format!("{base}basic/empty");
    s.put(&key, Bytes::new()).await.expect("put empty");
    assert_eq!(s.get(&key, None).await.expect("get empty"), Bytes::new(), "empty object");
    assert_eq!(s.head(&key).await.expect("head empty").map(|i| i.size_bytes), Some(0), "empty object size");
}

async fn overwrite(s: &dyn ObjectStore, base: &str) {
    let key = format!("{base}basic/overwritten");
    s.put(&key, Bytes::from_static(b"one")).await.expect("first put");
    s.put(&key, Bytes::from_static(b"two two")).await.expect("second put");
    assert_eq!(s.get(&key, None).await.expect("get"), Bytes::from_static(b"two two"), "overwrite replaces");
    assert_eq!(s.head(&key).await.expect("head").map(|i| i.size_bytes), Some(7), "overwrite size");
}

async fn missing(s: &dyn ObjectStore, base: &str) {
    let key = format!("{base}basic/never-written");
    let got = s.get(&key, None).await;
    assert!(matches!(&got, Err(ObjectError::NotFound(k)) if *k == key), "get of a missing key: {got:?}");
    let ranged = s.get(&key, Some(0..4)).await;
    assert!(matches!(ranged, Err(ObjectError::NotFound(_))), "ranged get of a missing key: {ranged:?}");
    assert_eq!(s.head(&key).await.expect("head of a missing key"), None, "head of a missing key");
}

async fn put_if_absent(s: &dyn ObjectStore, base: &str) {
    let key = format!("{base}manifests/LATEST");
    let first = s.put_if_absent(&key, Bytes::from_static(b"first")).await.expect("first put_if_absent");
    assert_eq!(first, PutIfAbsent::Created, "put_if_absent on a free key");
    let second = s.put_if_absent(&key, Bytes::from_static(b"second")).await.expect("second put_if_absent");
    assert_eq!(second, PutIfAbsent::Exists, "put_if_absent on a taken key");
    assert_eq!(s.get(&key, None).await.expect("get"), Bytes::from_static(b"first"), "the first body stays");
    // After a delete the key is free again.
    s.delete(&key).await.expect("delete");
    let third = s.put_if_absent(&key, Bytes::from_static(b"third")).await.expect("put_if_absent after delete");
    assert_eq!(third, PutIfAbsent::Created, "put_if_absent after a delete");
}

/// Keys whose order trips a naive folder walk: `a-b` sorts before `a/...` (`-` < `/`), and
/// `a0` after it. (No key is also a folder of other keys: a local folder cannot hold both.)
const LIST_KEYS: [&str; 8] = ["a-b", "a/c", "a/d/e", "a0", "b", "b0", "c/ü", "c/✓"];

async fn list_in_pages(s: &dyn ObjectStore, base: &str) {
    let dir = format!("{base}list/");
    for (i, k) in LIST_KEYS.iter().enumerate() {
        s.put(&format!("{dir}{k}"), pattern(i + 1, i as u64)).await.expect("put for list");
    }
    // A key that shares the prefix's text but not its folder, and one outside it.
    s.put(&format!("{base}list-outside"), Bytes::from_static(b"x")).await.expect("put outside");
    s.put(&format!("{base}other/z"), Bytes::from_static(b"x")).await.expect("put outside");

    let want: Vec<ObjectInfo> = LIST_KEYS
        .iter()
        .enumerate()
        .map(|(i, k)| ObjectInfo { key: format!("{dir}{k}"), size_bytes: i as u64 + 1 })
        .collect();
    let mut sorted = want.clone();
    sorted.sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
    assert_eq!(want, sorted, "the expected keys are in byte order");

    let (all, pages) = list_all(s, &dir, 2).await;
    assert_eq!(all, want, "listing in pages of 2 returns every key once, in key order");
    assert!(pages >= 4, "8 keys in pages of 2 take at least 4 pages, took {pages}");

    let one = s.list(&dir, None, 1000).await.expect("list in one page");
    assert_eq!(one, ListPage { objects: want.clone(), next: None }, "listing in one page");

    // A prefix that ends inside a segment matches by text, as S3's does.
    let (partial, _) = list_all(s, &format!("{dir}a"), 3).await;
    let keys: Vec<&str> = partial.iter().map(|o| o.key.strip_prefix(&dir).unwrap_or(&o.key)).collect();
    assert_eq!(keys, ["a-b", "a/c", "a/d/e", "a0"], "prefix ending inside a segment");
    let (sub, _) = list_all(s, &format!("{dir}a/"), 1).await;
    assert_eq!(sub.len(), 2, "prefix of a folder: {sub:?}");

    let (everything, _) = list_all(s, base, 3).await;
    assert!(everything.iter().any(|o| o.key == format!("{base}list-outside")), "base listing sees list-outside");
    assert!(everything.iter().any(|o| o.key == format!("{base}other/z")), "base listing sees other/z");
}

/// Lists all of `prefix` in pages of `limit`; checks each page's size. Returns the objects
/// and the number of pages.
pub async fn list_all(s: &dyn ObjectStore, prefix: &str, limit: usize) -> (Vec<ObjectInfo>, usize) {
    let mut all = Vec::new();
    let mut next = None;
    let mut pages = 0;
    loop {
        let page = s.list(prefix, next, limit).await.expect("list page");
        pages += 1;
        assert!(page.objects.len() <= limit, "page of {} over the limit {limit}", page.objects.len());
        assert!(page.objects.iter().all(|o| o.key.starts_with(prefix)), "key outside {prefix:?}: {page:?}");
        all.extend(page.objects);
        match page.next {
            Some(n) => next = Some(n),
            None => break,
        }
        assert!(pages < 10_000, "listing does not end");
    }
    (all, pages)
}

async fn list_of_an_empty_prefix(s: &dyn ObjectStore, base: &str) {
    let page = s.list(&format!("{base}nothing-here/"), None, 2).await.expect("list of an empty prefix");
    assert_eq!(page, ListPage::default(), "listing an empty prefix");
    let page = s.list(&format!("{base}basic/zzz"), None, 2).await.expect("list past every key");
    assert_eq!(page, ListPage::default(), "listing a prefix after every key");
}

async fn delete(s: &dyn ObjectStore, base: &str) {
    let key = format!("{base}delete/deep/er/object");
    let sibling = format!("{base}delete/deep/sibling");
    s.put(&key, Bytes::from_static(b"bye")).await.expect("put");
    s.put(&sibling, Bytes::from_static(b"stay")).await.expect("put sibling");
    s.delete(&key).await.expect("delete");
    assert_eq!(s.head(&key).await.expect("head after delete"), None, "head after delete");
    assert!(matches!(s.get(&key, None).await, Err(ObjectError::NotFound(_))), "get after delete");
    s.delete(&key).await.expect("delete again");
    s.delete(&format!("{base}delete/never")).await.expect("delete of a missing key");
    assert_eq!(s.get(&sibling, None).await.expect("sibling"), Bytes::from_static(b"stay"), "sibling untouched");
    let (left, _) = list_all(s, &format!("{base}delete/"), 10).await;
    assert_eq!(left.len(), 1, "only the sibling is left: {left:?}");
    // A key can be written again where a deleted one's folders were.
    s.put(&key, Bytes::from_static(b"back")).await.expect("put after delete");
    assert_eq!(s.get(&key, None).await.expect("get"), Bytes::from_static(b"back"), "written again");
}

async fn large_multipart(s: &dyn ObjectStore, base: &str) {
    let key = format!("{base}chunks/0f/large");
    let body = pattern(LARGE_BYTES, 77);
    s.put(&key, body.clone()).await.expect("large put");
    let got = s.get(&key, None).await.expect("large get");
    assert!(got == body, "large object reads back byte-exact (got {} bytes)", got.len());
    let info = s.head(&key).await.expect("head").expect("large object exists");
    assert_eq!(info.size_bytes, LARGE_BYTES as u64, "large object size");
    // Ranges across part boundaries (parts are 5-8 MiB) and at the end.
    let mib = 1024 * 1024;
    for range in [5 * mib - 10..5 * mib + 10, 8 * mib - 3..10 * mib + 3, LARGE_BYTES - 1000..LARGE_BYTES] {
        let got = s.get(&key, Some(range.start as u64..range.end as u64)).await.expect("large ranged get");
        assert!(got == body.slice(range.clone()), "large ranged get {range:?}");
    }
    // A large conditional write: taken key stays as it was.
    let again = s.put_if_absent(&key, pattern(LARGE_BYTES, 78)).await.expect("large put_if_absent on taken key");
    assert_eq!(again, PutIfAbsent::Exists, "large put_if_absent on a taken key");
    let fresh = format!("{base}chunks/0f/large-fresh");
    let created = s.put_if_absent(&fresh, body.clone()).await.expect("large put_if_absent");
    assert_eq!(created, PutIfAbsent::Created, "large put_if_absent on a free key");
    assert!(s.get(&fresh, None).await.expect("get") == body, "large put_if_absent reads back");
}

async fn unicode_and_spaces(s: &dyn ObjectStore, base: &str) {
    let key = format!("{base}names/ünï cödé ✓/with  spaces & (parens) + plus=eq?.bin");
    let body = Bytes::from_static("héllo wörld".as_bytes());
    s.put(&key, body.clone()).await.expect("put unicode key");
    assert_eq!(s.get(&key, None).await.expect("get unicode key"), body, "unicode key round trip");
    assert_eq!(s.head(&key).await.expect("head").map(|i| i.key), Some(key.clone()), "head names the key");
    let page = s.list(&format!("{base}names/ünï"), None, 10).await.expect("list unicode prefix");
    assert_eq!(page.objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), [key.as_str()], "listed");
    s.delete(&key).await.expect("delete unicode key");
    assert_eq!(s.head(&key).await.expect("head after delete"), None, "deleted");
}

async fn clean_up(s: &dyn ObjectStore, base: &str) {
    let (all, _) = list_all(s, base, 1000).await;
    for o in &all {
        s.delete(&o.key).await.expect("delete at clean up");
    }
    let page = s.list(base, None, 10).await.expect("list after clean up");
    assert_eq!(page, ListPage::default(), "nothing left after clean up");
}
