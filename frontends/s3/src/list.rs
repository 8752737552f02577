//! Listing: walk the bucket's directory tree in S3 key order.
//!
//! S3 orders keys by their bytes. A directory `d` holds the keys `d/...`, so among its siblings
//! it sorts as `d/`, not `d`: with entries `a` (a directory), `a-b` and `a0`, the key order is
//! `a-b` < `a/...` < `a0` ('-' < '/' < '0'). Each directory is read in name order (readdir
//! pages) and merged through a small heap keyed by that sort key: an entry leaves the heap
//! once the next unread name is larger, since a name's sort key is never smaller than the name.
//!
//! A listing starts at a bound (start-after, marker, continuation token, or the prefix) by
//! seeking, not scanning: in each directory, readdir starts after the bound's first segment,
//! and the few entries before it that still sort after the bound (directories whose name is a
//! prefix of that segment followed by a byte below '/') are looked up directly. With the
//! delimiter `/`, a directory below the prefix is one common prefix and is not walked (only
//! checked to hold at least one key); other delimiters walk every key and group them.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};

use s3s::dto::*;
use s3s::{S3Request, S3Response, S3Result, s3_error};
use tidepool_fs::{FileAttr, Fs, InodeKind, Result};

use crate::error::fs_error;
use crate::{TidepoolS3, lookup_opt, meta};

const PAGE: usize = 1024;
/// Appended to a common prefix to make an exclusive bound past every key it holds (no UTF-8
/// key contains the byte 0xFF).
const PAST: u8 = 0xFF;

pub struct ListQuery<'a> {
    pub prefix: &'a [u8],
    pub delimiter: Option<&'a [u8]>,
    /// List keys strictly after this (start-after, marker, or a decoded continuation token).
    pub after: Option<Vec<u8>>,
    pub max_keys: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Object { key: Vec<u8>, attr: FileAttr, etag: String },
    Prefix(Vec<u8>),
}

impl Item {
    pub fn key(&self) -> &[u8] {
        match self {
            Item::Object { key, .. } | Item::Prefix(key) => key,
        }
    }
}

pub struct Listing {
    pub items: Vec<Item>,
    pub truncated: bool,
}

impl Listing {
    /// Where the next page starts: after the last key, or past every key of the last prefix.
    pub fn next_after(&self) -> Option<Vec<u8>> {
        self.items.last().map(|i| match i {
            Item::Object { key, .. } => key.clone(),
            Item::Prefix(p) => [p.as_slice(), &[PAST]].concat(),
        })
    }
}

/// List the bucket whose directory is `bucket_ino`.
pub fn list(fs: &Fs, bucket_ino: u64, q: &ListQuery<'_>) -> Result<Listing> {
    if q.max_keys == 0 {
        return Ok(Listing { items: Vec::new(), truncated: false });
    }
    let want = q.max_keys + 1;
    let slash = q.delimiter == Some(b"/".as_slice());
    let (bound, inclusive) = start_bound(q);
    let mut out: Vec<Item> = Vec::new();
    let mut stack = vec![Frame::open(fs, bucket_ino, Vec::new(), Some((&bound, inclusive)))?];
    'walk: while out.len() < want {
        let Some(top) = stack.last_mut() else { break };
        let Some(p) = top.next(fs)? else {
            stack.pop();
            continue;
        };
        let mut key = [top.key_prefix.as_slice(), &p.name].concat();
        match p.attr.kind {
            InodeKind::File => {
                if key.starts_with(q.prefix) {
                    let x = fs.get_xattrs(p.attr.ino)?;
                    emit(&mut out, q, Item::Object { etag: meta::etag(&p.attr, &x), key, attr: p.attr });
                } else if key.as_slice() > q.prefix {
                    break 'walk;
                }
            }
            InodeKind::Dir => {
                key.push(b'/');
                let descend = if q.prefix.starts_with(&key) {
                    true
                } else if key.starts_with(q.prefix) {
                    if slash {
                        // A common prefix only if it holds a key after the start bound.
                        let holds = match &p.descend {
                            None => has_keys(fs, p.attr.ino)?,
                            Some((rest, _)) => {
                                let sub =
                                    ListQuery { prefix: b"", delimiter: None, after: Some(rest.clone()), max_keys: 1 };
                                !list(fs, p.attr.ino, &sub)?.items.is_empty()
                            }
                        };
                        if holds {
                            emit(&mut out, q, Item::Prefix(key.clone()));
                        }
                        false
                    } else {
                        true
                    }
                } else if key.as_slice() > q.prefix {
                    break 'walk;
                } else {
                    false
                };
                if !descend {
                    continue;
                }
                let x = fs.get_xattrs(p.attr.ino)?;
                let marker_in_range = match &p.descend {
                    None => true,
                    Some((rest, incl)) => rest.is_empty() && *incl,
                };
                if x.contains_key(meta::ETAG) && marker_in_range && key.starts_with(q.prefix) {
                    emit(
                        &mut out,
                        q,
                        Item::Object { etag: meta::etag(&p.attr, &x), key: key.clone(), attr: p.attr.clone() },
                    );
                }
                let bound = p.descend.as_ref().map(|(r, i)| (r.as_slice(), *i));
                stack.push(Frame::open(fs, p.attr.ino, key, bound)?);
            }
            InodeKind::Symlink => {}
        }
    }
    let truncated = out.len() > q.max_keys;
    out.truncate(q.max_keys);
    Ok(Listing { items: out, truncated })
}

/// The first key position: after `after` when it is past the prefix, else at the prefix
/// (inclusive). An `after` that is itself a common prefix skips every key it holds.
fn start_bound(q: &ListQuery<'_>) -> (Vec<u8>, bool) {
    match &q.after {
        Some(a) if a.as_slice() >= q.prefix => {
            if let Some(d) = q.delimiter
                && let Some(cp) = common_prefix(a, q.prefix, d)
                && cp.len() == a.len()
            {
                return ([a.as_slice(), &[PAST]].concat(), false);
            }
            (a.clone(), false)
        }
        _ => (q.prefix.to_vec(), true),
    }
}

/// The common prefix `key` rolls up into: through the first delimiter after the prefix.
fn common_prefix<'k>(key: &'k [u8], prefix: &[u8], delim: &[u8]) -> Option<&'k [u8]> {
    let rest = key.get(prefix.len()..)?;
    let i = rest.windows(delim.len()).position(|w| w == delim)?;
    Some(&key[..prefix.len() + i + delim.len()])
}

fn emit(out: &mut Vec<Item>, q: &ListQuery<'_>, item: Item) {
    if let (Some(d), Item::Object { key, .. }) = (q.delimiter, &item)
        && let Some(cp) = common_prefix(key, q.prefix, d)
    {
        if !matches!(out.last(), Some(Item::Prefix(p)) if p.as_slice() == cp) {
            out.push(Item::Prefix(cp.to_vec()));
        }
        return;
    }
    out.push(item);
}

/// Whether a directory holds at least one key (a file or a folder marker) anywhere below.
fn has_keys(fs: &Fs, dir: u64) -> Result<bool> {
    if fs.get_xattrs(dir)?.contains_key(meta::ETAG) {
        return Ok(true);
    }
    let mut after: Option<Vec<u8>> = None;
    loop {
        let (page, eof) = fs.readdir(dir, after.as_deref(), PAGE)?;
        for e in &page {
            match e.attr.kind {
                InodeKind::File => return Ok(true),
                InodeKind::Dir if has_keys(fs, e.attr.ino)? => return Ok(true),
                _ => {}
            }
        }
        match page.last() {
            Some(l) if !eof => after = Some(l.name.clone()),
            _ => return Ok(false),
        }
    }
}

/// An entry waiting in a directory's merge heap, ordered by its sort key (`name`, or `name/`
/// for a directory).
#[derive(Debug)]
struct Pending {
    sort: Vec<u8>,
    name: Vec<u8>,
    attr: FileAttr,
    /// For a directory the start bound falls into: the bound within it (and inclusive).
    descend: Option<(Vec<u8>, bool)>,
}

impl Pending {
    fn new(name: Vec<u8>, attr: FileAttr, descend: Option<(Vec<u8>, bool)>) -> Self {
        let mut sort = name.clone();
        if attr.kind == InodeKind::Dir {
            sort.push(b'/');
        }
        Pending { sort, name, attr, descend }
    }
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        self.sort == o.sort
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> Ordering {
        self.sort.cmp(&o.sort)
    }
}

/// One directory being listed in key order.
struct Frame {
    ino: u64,
    /// The key prefix of this directory's entries (`a/b/`; empty for the bucket).
    key_prefix: Vec<u8>,
    heap: BinaryHeap<Reverse<Pending>>,
    cursor: Option<Vec<u8>>,
    page: VecDeque<tidepool_fs::DirEntry>,
    eof: bool,
}

impl Frame {
    /// Open directory `ino` positioned at the first entry whose keys are after `bound`
    /// (relative to this directory; `inclusive` also admits a key equal to it).
    fn open(fs: &Fs, ino: u64, key_prefix: Vec<u8>, bound: Option<(&[u8], bool)>) -> Result<Frame> {
        let mut f = Frame { ino, key_prefix, heap: BinaryHeap::new(), cursor: None, page: VecDeque::new(), eof: false };
        let Some((x, inclusive)) = bound else { return Ok(f) };
        let (seg, rest) = match x.iter().position(|&b| b == b'/') {
            Some(i) => (&x[..i], Some(&x[i + 1..])),
            None => (x, None),
        };
        // Directories named by a prefix of `seg` followed by a byte below '/' sort (as `p/`)
        // after the bound although their names come before it.
        for j in 1..seg.len() {
            if seg[j] < b'/'
                && let Some(a) = lookup_opt(fs, ino, &seg[..j])?
                && a.kind == InodeKind::Dir
            {
                f.heap.push(Reverse(Pending::new(seg[..j].to_vec(), a, None)));
            }
        }
        if let Some(a) = lookup_opt(fs, ino, seg)? {
            match (a.kind, rest) {
                (InodeKind::Dir, Some(rest)) => {
                    f.heap.push(Reverse(Pending::new(seg.to_vec(), a, Some((rest.to_vec(), inclusive)))))
                }
                (InodeKind::Dir, None) => f.heap.push(Reverse(Pending::new(seg.to_vec(), a, None))),
                (InodeKind::File, None) if inclusive => f.heap.push(Reverse(Pending::new(seg.to_vec(), a, None))),
                _ => {}
            }
        }
        // Names after `seg/` (when the bound goes deeper) or after `seg` sort after the bound.
        f.cursor = Some(if rest.is_some() { [seg, b"/"].concat() } else { seg.to_vec() });
        Ok(f)
    }

    fn next(&mut self, fs: &Fs) -> Result<Option<Pending>> {
        loop {
            if self.page.is_empty() && !self.eof {
                let (entries, eof) = fs.readdir(self.ino, self.cursor.as_deref(), PAGE)?;
                self.eof = eof || entries.is_empty();
                if let Some(l) = entries.last() {
                    self.cursor = Some(l.name.clone());
                }
                self.page.extend(entries);
            }
            match (self.heap.peek(), self.page.front()) {
                (Some(Reverse(h)), Some(p)) if h.sort < p.name => return Ok(self.heap.pop().map(|r| r.0)),
                (_, Some(_)) => {
                    if let Some(e) = self.page.pop_front() {
                        self.heap.push(Reverse(Pending::new(e.name, e.attr, None)));
                    }
                }
                (_, None) => return Ok(self.heap.pop().map(|r| r.0)),
            }
        }
    }
}

/// S3's `encoding-type=url`: percent-encode everything but unreserved characters and '/'.
pub fn url_encode(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-_.~/".contains(&c) {
            s.push(c as char);
        } else {
            s.push_str(&format!("%{c:02X}"));
        }
    }
    s
}

fn hex_token(b: &[u8]) -> String {
    crate::object::hex(b)
}

fn decode_token(t: &str) -> S3Result<Vec<u8>> {
    let bad = || s3_error!(InvalidArgument, "the continuation token provided is incorrect");
    if !t.len().is_multiple_of(2) || !t.is_ascii() {
        return Err(bad());
    }
    (0..t.len() / 2).map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|_| bad())).collect()
}

struct Page {
    contents: Vec<Object>,
    prefixes: Vec<CommonPrefix>,
    truncated: bool,
    next_after: Option<Vec<u8>>,
    count: usize,
}

impl TidepoolS3 {
    fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        after: Option<Vec<u8>>,
        max_keys: Option<i32>,
        url: bool,
    ) -> S3Result<Page> {
        let b = self.require_bucket(bucket)?;
        let max_keys = match max_keys {
            None => 1000,
            Some(n) if n < 0 => return Err(s3_error!(InvalidArgument, "max-keys must be 0 or more")),
            Some(n) => (n as usize).min(1000),
        };
        let q = ListQuery {
            prefix: prefix.as_bytes(),
            delimiter: delimiter.filter(|d| !d.is_empty()).map(str::as_bytes),
            after,
            max_keys,
        };
        let listing = list(&self.fs, b.ino, &q).map_err(|e| fs_error(e, bucket))?;
        let enc = |k: &[u8]| if url { url_encode(k) } else { String::from_utf8_lossy(k).into_owned() };
        let mut page = Page {
            contents: Vec::new(),
            prefixes: Vec::new(),
            truncated: listing.truncated,
            next_after: listing.truncated.then(|| listing.next_after()).flatten(),
            count: listing.items.len(),
        };
        for item in listing.items {
            match item {
                Item::Object { key, attr, etag } => page.contents.push(Object {
                    key: Some(enc(&key)),
                    size: Some(if attr.kind == InodeKind::File { attr.size as i64 } else { 0 }),
                    e_tag: Some(ETag::Strong(etag)),
                    last_modified: Some(meta::timestamp(attr.mtime)),
                    storage_class: Some(ObjectStorageClass::from_static(ObjectStorageClass::STANDARD)),
                    ..Default::default()
                }),
                Item::Prefix(p) => page.prefixes.push(CommonPrefix { prefix: Some(enc(&p)) }),
            }
        }
        Ok(page)
    }

    pub(crate) async fn op_list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let i = req.input;
        let url = i.encoding_type.as_ref().is_some_and(|e| e.as_str() == EncodingType::URL);
        let after = match &i.continuation_token {
            Some(t) => Some(decode_token(t)?),
            None => i.start_after.as_ref().map(|s| s.as_bytes().to_vec()),
        };
        let prefix = i.prefix.clone().unwrap_or_default();
        let page = self.list_page(&i.bucket, &prefix, i.delimiter.as_deref(), after, i.max_keys, url)?;
        let enc = |s: &str| if url { url_encode(s.as_bytes()) } else { s.to_owned() };
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(i.bucket.clone()),
            prefix: Some(enc(&prefix)),
            delimiter: i.delimiter.as_deref().map(enc),
            start_after: i.start_after.as_deref().map(enc),
            max_keys: Some(i.max_keys.unwrap_or(1000).clamp(0, 1000)),
            key_count: Some(page.count as i32),
            continuation_token: i.continuation_token.clone(),
            next_continuation_token: page.next_after.as_deref().map(hex_token),
            is_truncated: Some(page.truncated),
            contents: Some(page.contents),
            common_prefixes: (!page.prefixes.is_empty()).then_some(page.prefixes),
            encoding_type: i.encoding_type.clone(),
            ..Default::default()
        }))
    }

    pub(crate) async fn op_list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let i = req.input;
        let url = i.encoding_type.as_ref().is_some_and(|e| e.as_str() == EncodingType::URL);
        let prefix = i.prefix.clone().unwrap_or_default();
        let after = i.marker.as_ref().filter(|m| !m.is_empty()).map(|m| m.as_bytes().to_vec());
        let delimiter = i.delimiter.as_deref().filter(|d| !d.is_empty());
        let mut page = self.list_page(&i.bucket, &prefix, delimiter, after, i.max_keys, url)?;
        let enc = |s: &str| if url { url_encode(s.as_bytes()) } else { s.to_owned() };
        // S3 gives NextMarker only with a delimiter (else clients take the last key); it is
        // the last key or common prefix, which `start_bound` knows to skip past.
        let next_marker = if page.truncated && delimiter.is_some() {
            page.next_after.take().map(|mut a| {
                if a.last() == Some(&PAST) {
                    a.pop();
                }
                if url { url_encode(&a) } else { String::from_utf8_lossy(&a).into_owned() }
            })
        } else {
            None
        };
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(i.bucket.clone()),
            prefix: Some(enc(&prefix)),
            delimiter: i.delimiter.as_deref().map(enc),
            marker: Some(i.marker.as_deref().map(enc).unwrap_or_default()),
            max_keys: Some(i.max_keys.unwrap_or(1000).clamp(0, 1000)),
            is_truncated: Some(page.truncated),
            next_marker,
            contents: Some(page.contents),
            common_prefixes: (!page.prefixes.is_empty()).then_some(page.prefixes),
            encoding_type: i.encoding_type.clone(),
            ..Default::default()
        }))
    }
}
