//! The gaps closed after the first S3 release, driven by boto3 (`boto3_integrity.py`) against
//! the service in-process: signatures must name the endpoint's region, bucket creation dates
//! stay put, GET / HEAD by `partNumber`, and additional checksums (`x-amz-checksum-*`).

mod common;

use tidepool_fs::ROOT_INO;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_creation_dates_part_numbers_and_checksums() {
    let srv = common::start().await;
    // A bucket made without S3 (as NFS `mkdir` does): its creation date is recorded at the
    // first listing and stays.
    srv.env.fs.mkdir(ROOT_INO, b"nfsmade", 0o755, 0, 0).await.unwrap();
    common::run_boto3_script("boto3_integrity.py", srv.endpoint()).await;

    // What the metadata map holds: the reserved keys, never shown as user metadata.
    let fs = &srv.env.fs;
    let bucket = fs.resolve(b"/integ").unwrap();
    assert!(fs.get_xattrs(bucket.ino).unwrap().contains_key(":bucket-created"));
    let nfs = fs.resolve(b"/nfsmade").unwrap();
    assert!(fs.get_xattrs(nfs.ino).unwrap().contains_key(":bucket-created"), "recorded at the first listing");
    let mp = fs.resolve(b"/integ/mp").unwrap();
    let x = fs.get_xattrs(mp.ino).unwrap();
    assert_eq!(x.get(":mp-parts").map(String::as_str), Some("1:5242880*2,1048576"), "{x:?}");
    let sha = fs.resolve(b"/integ/ck/sha").unwrap();
    let x = fs.get_xattrs(sha.ino).unwrap();
    assert!(x.contains_key(":checksum-sha256") && x.get(":checksum-type").is_some_and(|t| t == "FULL_OBJECT"), "{x:?}");
    let staging = fs.resolve(b"/.tidepool/tmp").unwrap();
    assert!(fs.readdir(staging.ino, None, 10).unwrap().0.is_empty(), "refused uploads left nothing");
    srv.stop().await;
}
