//! GET and HEAD: conditionals (RFC 9110, as S3), one `Range` or one `partNumber` (a multipart
//! object's parts are the ranges recorded at Complete, `:mp-parts`), the stored additional
//! checksum with `x-amz-checksum-mode: ENABLED`, and the body streamed block by block with a
//! bounded read-ahead.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::Bytes;
use s3s::dto::*;
use s3s::{S3Error, S3Request, S3Response, S3Result, s3_error};
use tidepool_fs::{FileAttr, Fs, InodeKind};

use crate::TidepoolS3;
use crate::checksum;
use crate::meta::{self, SystemHeaders};
use crate::object::{etag_matches, set_checksum_fields};

impl TidepoolS3 {
    pub(crate) async fn op_get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        let (attr, x) = self.find_object(&input.bucket, &input.key)?;
        let etag = meta::etag(&attr, &x);
        check_read_conditions(
            &etag,
            attr.mtime,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
            input.if_modified_since.as_ref(),
            input.if_unmodified_since.as_ref(),
        )?;
        let size = if attr.kind == InodeKind::File { attr.size } else { 0 };
        let span = read_span(&attr, &x, size, input.range.as_ref(), input.part_number)?;
        let (start, len, content_range) = (span.start, span.len, span.content_range);
        let body = if len == 0 {
            None
        } else if len <= self.fs.options().block_size as u64 {
            // At most one block: read it before answering, so the head and the body leave in
            // one write (one segment, one wake-up of the client) and a failed read is an S3
            // error rather than a cut connection. A streamed body would hold this block too.
            Some(read_whole(&self.fs, attr.ino, start, len, &input.key).await?)
        } else {
            Some(body_stream(self.fs.clone(), attr.ino, start, len))
        };
        self.metrics.bytes_out(len);
        let sys = SystemHeaders::from_xattrs(&x);
        let ck = checksum_for(&attr, &x, input.checksum_mode.as_ref(), span.whole);
        let mut output = GetObjectOutput {
            body,
            content_length: Some(len as i64),
            content_range,
            parts_count: span.parts_count,
            accept_ranges: Some("bytes".into()),
            e_tag: Some(ETag::Strong(etag)),
            last_modified: Some(meta::timestamp(attr.mtime)),
            metadata: meta::user_metadata(&x),
            content_type: sys.content_type.or_else(|| Some("binary/octet-stream".into())),
            content_encoding: sys.content_encoding,
            content_disposition: sys.content_disposition,
            cache_control: sys.cache_control,
            content_language: sys.content_language,
            expires: sys.expires,
            ..Default::default()
        };
        if let Some(c) = ck {
            output.checksum_type = Some(c.checksum_type());
            set_checksum_fields!(output, c.fields());
        }
        Ok(S3Response::new(output))
    }

    pub(crate) async fn op_head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let input = req.input;
        let (attr, x) = self.find_object(&input.bucket, &input.key)?;
        let etag = meta::etag(&attr, &x);
        check_read_conditions(
            &etag,
            attr.mtime,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
            input.if_modified_since.as_ref(),
            input.if_unmodified_since.as_ref(),
        )?;
        let size = if attr.kind == InodeKind::File { attr.size } else { 0 };
        let span = read_span(&attr, &x, size, input.range.as_ref(), input.part_number)?;
        let (len, content_range) = (span.len, span.content_range);
        let sys = SystemHeaders::from_xattrs(&x);
        let ck = checksum_for(&attr, &x, input.checksum_mode.as_ref(), span.whole);
        let mut output = HeadObjectOutput {
            content_length: Some(len as i64),
            content_range,
            parts_count: span.parts_count,
            accept_ranges: Some("bytes".into()),
            e_tag: Some(ETag::Strong(etag)),
            last_modified: Some(meta::timestamp(attr.mtime)),
            metadata: meta::user_metadata(&x),
            content_type: sys.content_type.or_else(|| Some("binary/octet-stream".into())),
            content_encoding: sys.content_encoding,
            content_disposition: sys.content_disposition,
            cache_control: sys.cache_control,
            content_language: sys.content_language,
            expires: sys.expires,
            ..Default::default()
        };
        if let Some(c) = ck {
            output.checksum_type = Some(c.checksum_type());
            set_checksum_fields!(output, c.fields());
        }
        Ok(S3Response::new(output))
    }
}

/// The part of an object a GET or HEAD answers.
struct ReadSpan {
    start: u64,
    len: u64,
    /// Set for a `Range` or `partNumber` request (the answer is then 206).
    content_range: Option<String>,
    /// `x-amz-mp-parts-count`: answered with `partNumber` on a multipart object, as S3.
    parts_count: Option<i32>,
    /// The answer is the whole object (so its whole-object checksum applies).
    whole: bool,
}

/// `Range` or `partNumber` (not both, as S3): a multipart object's part `n` is the range it was
/// uploaded as (sizes from `:mp-parts`); any other object has one part, the whole object.
fn read_span(
    attr: &FileAttr,
    x: &BTreeMap<String, String>,
    size: u64,
    range: Option<&Range>,
    part_number: Option<i32>,
) -> S3Result<ReadSpan> {
    let content_range = |start: u64, end: u64| (end > start).then(|| format!("bytes {start}-{}/{size}", end - 1));
    match (range, part_number) {
        (None, None) => Ok(ReadSpan { start: 0, len: size, content_range: None, parts_count: None, whole: true }),
        (Some(r), None) => {
            let span = r.check(size)?;
            Ok(ReadSpan {
                start: span.start,
                len: span.end - span.start,
                content_range: Some(format!("bytes {}-{}/{size}", span.start, span.end - 1)),
                parts_count: None,
                whole: false,
            })
        }
        (Some(_), Some(_)) => {
            Err(s3_error!(InvalidRequest, "Cannot specify both Range header and partNumber query parameter."))
        }
        (None, Some(n)) => {
            if !(1..=crate::multipart::MAX_PART_NUMBER).contains(&n) {
                return Err(s3_error!(
                    InvalidArgument,
                    "Part number must be an integer between 1 and 10000, inclusive"
                ));
            }
            let parts = if attr.kind == InodeKind::File { meta::PartSizes::load(attr, x) } else { None };
            let (start, end, parts_count, whole) = match &parts {
                Some(p) => {
                    let (start, end) = p.range(n as usize).ok_or_else(invalid_part_number)?;
                    // A part's own checksum is not kept: none is answered for it.
                    (start, end, Some(p.count() as i32), false)
                }
                None if n == 1 => (0, size, None, true),
                None => return Err(invalid_part_number()),
            };
            Ok(ReadSpan { start, len: end - start, content_range: content_range(start, end), parts_count, whole })
        }
    }
}

/// The stored checksum, answered with `x-amz-checksum-mode: ENABLED` when the answer is the
/// whole object (S3 answers none for a range).
fn checksum_for(
    attr: &FileAttr,
    x: &BTreeMap<String, String>,
    mode: Option<&ChecksumMode>,
    whole: bool,
) -> Option<checksum::Stored> {
    let enabled = mode.is_some_and(|m| m.as_str().eq_ignore_ascii_case(ChecksumMode::ENABLED));
    if !enabled || !whole || attr.kind != InodeKind::File {
        return None;
    }
    checksum::Stored::load(attr, x)
}

fn invalid_part_number() -> S3Error {
    let mut e = S3Error::with_message(
        s3s::S3ErrorCode::Custom("InvalidPartNumber".into()),
        "The requested partnumber is not satisfiable",
    );
    e.set_status_code(hyper::StatusCode::RANGE_NOT_SATISFIABLE);
    e
}

/// GET / HEAD conditionals as S3 (RFC 9110): If-Match wins over If-Unmodified-Since (412),
/// If-None-Match wins over If-Modified-Since (304). HTTP dates have whole seconds.
fn check_read_conditions(
    etag: &str,
    mtime: i64,
    if_match: Option<&ETagCondition>,
    if_none_match: Option<&ETagCondition>,
    if_modified_since: Option<&Timestamp>,
    if_unmodified_since: Option<&Timestamp>,
) -> S3Result<()> {
    let secs = mtime.div_euclid(1_000_000_000);
    if let Some(c) = if_match {
        if !etag_matches(c, etag) {
            return Err(s3_error!(PreconditionFailed, "If-Match: the ETag differs"));
        }
    } else if let Some(t) = if_unmodified_since
        && secs > meta::unix_secs(t)
    {
        return Err(s3_error!(PreconditionFailed, "If-Unmodified-Since: modified since"));
    }
    if let Some(c) = if_none_match {
        if etag_matches(c, etag) {
            return Err(not_modified(etag));
        }
    } else if let Some(t) = if_modified_since
        && secs <= meta::unix_secs(t)
    {
        return Err(not_modified(etag));
    }
    Ok(())
}

fn not_modified(etag: &str) -> S3Error {
    let mut e = S3Error::new(s3s::S3ErrorCode::NotModified);
    let mut h = hyper::HeaderMap::new();
    if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("\"{etag}\"")) {
        h.insert(hyper::header::ETAG, v);
    }
    e.set_headers(h);
    e
}

/// The bytes `[start, start + len)` of file `ino`, read now, as a body that is ready at once.
async fn read_whole(fs: &Fs, ino: u64, start: u64, len: u64, key: &str) -> S3Result<StreamingBlob> {
    let pieces = fs.read_bytes(ino, start, len as usize).await.map_err(|e| crate::error::fs_error(e, key))?;
    if pieces.iter().map(|p| p.len() as u64).sum::<u64>() != len {
        // The key now names another object (or NFS truncated it) since it was looked up.
        return Err(s3_error!(InternalError, "object was replaced or truncated while it was read"));
    }
    // One chunk, so that hyper sends it with the head in one write: the piece itself when
    // there is one (the usual case), else the pieces joined (a range over two blocks, a hole).
    let data = match <[Bytes; 1]>::try_from(pieces) {
        Ok([one]) => one,
        Err(pieces) => Bytes::from(pieces.concat()),
    };
    Ok(StreamingBlob::new(Ready(Some(data))))
}

/// A body already in memory: one chunk, its length known.
struct Ready(Option<Bytes>);

impl futures_util::Stream for Ready {
    type Item = Result<Bytes, s3s::StdError>;

    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(self.0.take().map(Ok))
    }
}

impl s3s::stream::ByteStream for Ready {
    fn remaining_length(&self) -> s3s::stream::RemainingLength {
        s3s::stream::RemainingLength::new_exact(self.0.as_ref().map_or(0, Bytes::len))
    }
}

/// The bytes `[start, start + len)` of file `ino` as a response body, streamed: reads are
/// aligned to blocks and run ahead of the client by up to [`READ_AHEAD`] blocks. Each block
/// is handed on as the pieces `Fs::read_bytes` answers: a block read from the device goes to
/// the socket from the store's read buffer, with no copy in user space.
/// Blocks of a GET read ahead of the client: at most this many block-sized reads are in
/// flight or waiting to be sent, so a GET holds at most `READ_AHEAD x block_size` of body.
const READ_AHEAD: usize = 4;

fn body_stream(fs: Arc<Fs>, ino: u64, start: u64, len: u64) -> StreamingBlob {
    let bs = fs.options().block_size as u64;
    // A permit per block, taken before its read starts and given back when the response
    // has taken the block's last piece: reads run ahead by READ_AHEAD blocks at most.
    let permits = Arc::new(tokio::sync::Semaphore::new(READ_AHEAD));
    let (tx, rx) = tokio::sync::mpsc::channel::<Block>(READ_AHEAD);
    tokio::spawn(async move {
        let end = start + len;
        let mut next = start;
        let mut pending = std::collections::VecDeque::with_capacity(READ_AHEAD);
        while next < end || !pending.is_empty() {
            while next < end && pending.len() < READ_AHEAD && !tx.is_closed() {
                // Blocks only while earlier blocks wait in the channel for the client.
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let n = (bs - next % bs).min(end - next);
                let fs = fs.clone();
                let off = next;
                let read = tokio::spawn(async move { fs.read_bytes(ino, off, n as usize).await });
                pending.push_back((read, n, permit));
                next += n;
            }
            let Some((read, n, permit)) = pending.pop_front() else { return };
            let item = match read.await {
                Ok(Ok(p)) if p.iter().map(|b| b.len() as u64).sum::<u64>() == n => Ok(p.into_iter()),
                Ok(Ok(_)) => Err(std::io::Error::other("object was replaced or truncated while it was read")),
                Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            let failed = item.is_err();
            // On an error (or a gone client) the reads still in flight are left to finish
            // on their own; their results are dropped.
            if tx.send(Block { item, _permit: permit }).await.is_err() || failed {
                return;
            }
        }
    });
    StreamingBlob::new(RxStream { rx, current: None, remaining: len as usize })
}

/// One block of a GET body (its pieces) and the read-ahead permit it holds until its last
/// piece is handed on.
struct Block {
    item: Result<std::vec::IntoIter<Bytes>, std::io::Error>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

struct RxStream {
    rx: tokio::sync::mpsc::Receiver<Block>,
    /// The block whose pieces are being handed on.
    current: Option<Block>,
    remaining: usize,
}

impl futures_util::Stream for RxStream {
    type Item = Result<Bytes, s3s::StdError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(block) = self.current.as_mut() {
                match &mut block.item {
                    Ok(pieces) => match pieces.next() {
                        Some(b) => {
                            if pieces.as_slice().is_empty() {
                                // Its last piece is handed on: the permit goes back now.
                                self.current = None;
                            }
                            self.remaining = self.remaining.saturating_sub(b.len());
                            return Poll::Ready(Some(Ok(b)));
                        }
                        None => self.current = None,
                    },
                    Err(e) => {
                        let e = std::mem::replace(e, std::io::Error::other("body already failed"));
                        self.current = None;
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                }
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(block)) => self.current = Some(block),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl s3s::stream::ByteStream for RxStream {
    fn remaining_length(&self) -> s3s::stream::RemainingLength {
        s3s::stream::RemainingLength::new_exact(self.remaining)
    }
}
