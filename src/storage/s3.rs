//! S3-compatible object storage through `object_store`. The checkpoint at
//! `s3://bucket/prefix` has the same files as on a disk (`prefix/.metadata`,
//! `prefix/__0_0.distcp`, ...), so it can be copied between a disk and a bucket as is.
//!
//! Data files are multipart uploads whose parts go up in parallel while the writer produces the
//! next ones; an upload that is dropped before it is completed is aborted. Reads are ranged GETs.
//! `object_store` retries throttling and transient errors with backoff. Its async runtime is
//! private to libdcp: callers see blocking calls, from any thread.
//!
//! Settings come from the standard AWS environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, ...) and can be
//! overridden per context (`aws_endpoint`, `aws_virtual_hosted_style_request`, ...: the
//! `object_store` S3 configuration keys).

use super::{ReadHandle, Storage, WriteHandle};
use crate::error::{Error, ErrorKind, Result};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig, WriteMultipart};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Parts of a multipart upload.
const PART_BYTES: usize = 16 << 20;
/// Parts in flight per uploaded file.
const PARTS_IN_FLIGHT: usize = 8;

/// libdcp's runtime for this process. A child made by fork() inherits the parent's runtime
/// without its threads: it gets a new one (the inherited one is left alone, never dropped).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: Mutex<Option<(u32, &'static tokio::runtime::Runtime)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut g = crate::error::lock(&RT);
    match *g {
        Some((owner, rt)) if owner == pid => rt,
        _ => {
            let rt: &'static tokio::runtime::Runtime = Box::leak(Box::new(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(4)
                    .thread_name("dcp-s3")
                    .enable_all()
                    .build()
                    .expect("the S3 runtime starts"),
            ));
            *g = Some((pid, rt));
            rt
        }
    }
}

/// Runs a future on libdcp's runtime and waits for it, from any thread (also from inside the
/// caller's own tokio runtime, where blocking on another runtime is not allowed directly).
fn block<F: Future + Send>(f: F) -> F::Output
where
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| s.spawn(|| runtime().block_on(f)).join().expect("the S3 call does not panic"))
    } else {
        runtime().block_on(f)
    }
}

/// `s3://bucket/prefix` split into its parts.
pub fn parse_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| Error::invalid(format!("{url:?} is not an s3:// URL")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::invalid(format!("{url:?} names no bucket")));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// A prefix of an S3-compatible bucket (`s3://bucket/prefix`).
pub struct S3Storage {
    store: Arc<AmazonS3>,
    bucket: String,
    prefix: String,
}

impl S3Storage {
    /// Opens `s3://bucket/prefix` with settings from the AWS environment, then `options` (pairs
    /// of `object_store` S3 configuration keys and values).
    pub fn new(url: &str, options: &[(String, String)]) -> Result<S3Storage> {
        let (bucket, prefix) = parse_url(url)?;
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&bucket);
        // The AWS SDKs' AWS_ENDPOINT_URL; object_store reads AWS_ENDPOINT.
        if let Ok(ep) = std::env::var("AWS_ENDPOINT_URL") {
            if !ep.is_empty() && std::env::var("AWS_ENDPOINT").is_err() {
                b = b.with_endpoint(ep);
            }
        }
        for (k, v) in options {
            let key: AmazonS3ConfigKey = k
                .parse()
                .map_err(|_| Error::invalid(format!("{k:?} is not an S3 configuration key")))?;
            b = b.with_config(key, v);
        }
        let retry = RetryConfig {
            max_retries: 6,
            retry_timeout: Duration::from_secs(120),
            ..Default::default()
        };
        let store = b
            .with_retry(retry)
            .build()
            .map_err(|e| Error::invalid(format!("S3 settings for {url}: {e}")))?;
        Ok(S3Storage {
            store: Arc::new(store),
            bucket,
            prefix,
        })
    }

    fn path(&self, name: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(name)
        } else {
            ObjPath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// The prefix as a listing path; `None` for the bucket's root.
    fn prefix_path(&self) -> Option<ObjPath> {
        (!self.prefix.is_empty()).then(|| ObjPath::from(self.prefix.as_str()))
    }

    fn url(&self, name: &str) -> String {
        match (self.prefix.is_empty(), name.is_empty()) {
            (true, _) => format!("s3://{}/{name}", self.bucket),
            (false, true) => format!("s3://{}/{}", self.bucket, self.prefix),
            (false, false) => format!("s3://{}/{}/{name}", self.bucket, self.prefix),
        }
    }

    /// Whether the store refuses a second create-only put of one key (probed once per bucket).
    fn conditional_put_works(&self) -> bool {
        static PROBED: OnceLock<Mutex<HashMap<String, bool>>> = OnceLock::new();
        let key = format!("{}/{}", self.store, self.bucket);
        let map = PROBED.get_or_init(Default::default);
        if let Some(&v) = crate::error::lock(map).get(&key) {
            return v;
        }
        let probe = self.path(&format!(".libdcp-probe-{}", std::process::id()));
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let works = block(async {
            let _ = self.store.delete(&probe).await;
            let first = self.store.put_opts(&probe, PutPayload::from_static(b"1"), create.clone()).await;
            let second = self.store.put_opts(&probe, PutPayload::from_static(b"2"), create).await;
            let _ = self.store.delete(&probe).await;
            first.is_ok() && matches!(second, Err(object_store::Error::AlreadyExists { .. }))
        });
        if !works {
            eprintln!(
                "libdcp: {} does not support conditional writes (If-None-Match); refusing to replace a checkpoint relies on an existence check made just before the write",
                self.url("")
            );
        }
        crate::error::lock(map).insert(key, works);
        works
    }
}

/// An `object_store` error as a libdcp error naming the object.
fn s3_err(what: &str, url: &str, e: object_store::Error) -> Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => ErrorKind::NotFound,
        object_store::Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
        object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. } => ErrorKind::Unsupported,
        _ => ErrorKind::Io,
    };
    Error::new(kind, format!("{what} {url}: {e}"))
}

struct S3Read {
    store: Arc<AmazonS3>,
    path: ObjPath,
    url: String,
    len: u64,
}

impl ReadHandle for S3Read {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        super::check_range(&self.url, offset, buf.len(), self.len)?;
        if buf.is_empty() {
            return Ok(());
        }
        let bytes = block(self.store.get_range(&self.path, offset..offset + buf.len() as u64))
            .map_err(|e| s3_err(&format!("reading {} bytes at offset {offset} of", buf.len()), &self.url, e))?;
        if bytes.len() != buf.len() {
            return Err(Error::corrupt(format!(
                "{}: asked for {} bytes at offset {offset}, got {}",
                self.url,
                buf.len(),
                bytes.len()
            )));
        }
        buf.copy_from_slice(&bytes);
        Ok(())
    }
}

/// A data file being uploaded: appends feed a multipart upload (no positional writes: an object
/// is uploaded front to back).
struct S3Write {
    url: String,
    state: Mutex<UploadState>,
}

struct UploadState {
    upload: Option<WriteMultipart>,
    written: u64,
}

impl WriteHandle for S3Write {
    fn append(&self, data: &[u8]) -> Result<()> {
        let mut st = crate::error::lock(&self.state);
        let url = &self.url;
        let upload = st
            .upload
            .as_mut()
            .ok_or_else(|| Error::internal(format!("{url}: write after the upload finished")))?;
        // Bounded memory: wait until fewer than PARTS_IN_FLIGHT parts are uploading.
        block(upload.wait_for_capacity(PARTS_IN_FLIGHT)).map_err(|e| s3_err("uploading a part of", url, e))?;
        let _in_runtime = runtime().enter();
        upload.write(data);
        st.written += data.len() as u64;
        Ok(())
    }
    fn direct_alignment(&self) -> Option<usize> {
        None
    }
    fn set_len(&self, len: u64) -> Result<()> {
        let st = crate::error::lock(&self.state);
        if len != st.written {
            return Err(Error::internal(format!(
                "{}: {} bytes were appended but the file is to be {len} bytes long (an object cannot be truncated or extended)",
                self.url, st.written
            )));
        }
        Ok(())
    }
    /// Completes the multipart upload: the object appears whole, or not at all.
    fn sync(&self) -> Result<()> {
        let upload = crate::error::lock(&self.state).upload.take();
        if let Some(u) = upload {
            block(u.finish()).map_err(|e| s3_err("completing the upload of", &self.url, e))?;
        }
        Ok(())
    }
}

impl Drop for S3Write {
    /// An upload that was not completed (the save failed) is aborted, leaving no parts behind.
    fn drop(&mut self) {
        let upload = crate::error::lock(&self.state).upload.take();
        if let Some(u) = upload {
            let _ = block(u.abort());
        }
    }
}

impl Storage for S3Storage {
    fn describe(&self, name: &str) -> String {
        self.url(name)
    }

    fn prepare(&self) -> Result<()> {
        self.check_reachable()
    }

    /// Checks that the bucket exists and these credentials may list it.
    fn check_reachable(&self) -> Result<()> {
        block(self.store.list_with_delimiter(self.prefix_path().as_ref()))
            .map(|_| ())
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("NoSuchBucket") || matches!(e, object_store::Error::NotFound { .. }) {
                    Error::not_found(format!("bucket {:?} does not exist ({}): {text}", self.bucket, self.url("")))
                } else {
                    s3_err("listing", &self.url(""), e)
                }
            })
    }

    fn exists(&self, name: &str) -> Result<bool> {
        super::check_name(name)?;
        match block(self.store.head(&self.path(name))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(s3_err("checking", &self.url(name), e)),
        }
    }

    fn open_read(&self, name: &str) -> Result<Arc<dyn ReadHandle>> {
        super::check_name(name)?;
        let path = self.path(name);
        let meta = block(self.store.head(&path)).map_err(|e| s3_err("opening", &self.url(name), e))?;
        Ok(Arc::new(S3Read {
            store: self.store.clone(),
            path,
            url: self.url(name),
            len: meta.size,
        }))
    }

    fn read_all(&self, name: &str) -> Result<Vec<u8>> {
        super::check_name(name)?;
        let url = self.url(name);
        let path = self.path(name);
        let bytes = block(async { self.store.get(&path).await?.bytes().await }).map_err(|e| s3_err("reading", &url, e))?;
        Ok(bytes.to_vec())
    }

    /// Exclusive only as far as a check made just before the upload starts: a multipart upload
    /// cannot be made create-only through `object_store` (its completion takes no
    /// `If-None-Match`), so a writer that creates the same key between the check and the
    /// completion is replaced, last completion wins. The engine gives every save fresh data-file
    /// names, and the commit (`put_new`, a conditional put) decides which save owns the prefix.
    /// There are no links in a bucket to write through.
    fn create(&self, name: &str, _direct: bool) -> Result<Arc<dyn WriteHandle>> {
        super::check_name(name)?;
        let url = self.url(name);
        if self.exists(name)? {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{url} already exists: libdcp creates its data files new and does not write over anything"),
            ));
        }
        let upload = block(self.store.put_multipart(&self.path(name))).map_err(|e| s3_err("starting the upload of", &url, e))?;
        let upload = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        Ok(Arc::new(S3Write {
            url,
            state: Mutex::new(UploadState {
                upload: Some(upload),
                written: 0,
            }),
        }))
    }

    /// A single PUT: atomic in S3, no temporary object.
    fn put_atomic(&self, name: &str, data: &[u8]) -> Result<()> {
        super::check_name(name)?;
        let payload = PutPayload::from(data.to_vec());
        block(self.store.put(&self.path(name), payload))
            .map(|_| ())
            .map_err(|e| s3_err("writing", &self.url(name), e))
    }

    fn put_new(&self, name: &str, data: &[u8]) -> Result<()> {
        super::check_name(name)?;
        if !self.conditional_put_works() {
            return super::put_new_checked(self, name, data);
        }
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        block(self.store.put_opts(&self.path(name), PutPayload::from(data.to_vec()), opts))
            .map(|_| ())
            .map_err(|e| match e {
                object_store::Error::AlreadyExists { .. } => Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} already exists (another save committed there first)", self.url(name)),
                ),
                e => s3_err("writing", &self.url(name), e),
            })
    }

    fn remove(&self, name: &str) -> Result<()> {
        super::check_name(name)?;
        match block(self.store.delete(&self.path(name))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_err("deleting", &self.url(name), e)),
        }
    }

    fn sync_dir(&self) -> Result<()> {
        Ok(())
    }

    /// The objects directly under the prefix. Some servers (SeaweedFS) also list the prefix
    /// itself as an object once everything under it was removed: that is not a file of the
    /// checkpoint.
    fn list(&self) -> Result<Vec<String>> {
        let listed = block(self.store.list_with_delimiter(self.prefix_path().as_ref())).map_err(|e| s3_err("listing", &self.url(""), e))?;
        Ok(listed
            .objects
            .into_iter()
            .filter_map(|o| {
                let name = o.location.filename()?;
                (self.path(name) == o.location).then(|| name.to_string())
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_url("s3://b/p/q/").unwrap(), ("b".to_string(), "p/q".to_string()));
        assert_eq!(parse_url("s3://b").unwrap(), ("b".to_string(), String::new()));
        assert!(parse_url("s3:///x").is_err());
        assert!(parse_url("/tmp/x").is_err());
    }

    /// A fresh `s3://bucket/prefix/{what}-{pid}-{nanos}` under `DCP_TEST_S3_URL`, or `None`
    /// (and a line saying the test skipped) without it. `tests/python/test_s3.py` starts a
    /// local S3 server and runs the `server_` tests with that variable and the AWS settings in
    /// the environment, and checks that they ran.
    fn server_url(what: &str) -> Option<String> {
        let Ok(base) = std::env::var("DCP_TEST_S3_URL") else {
            println!("SKIPPED: no S3 server (DCP_TEST_S3_URL is unset; tests/python/test_s3.py starts one and runs this test)");
            return None;
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Some(format!("{}/{what}-{}-{nanos}", base.trim_end_matches('/'), std::process::id()))
    }

    /// The storage conformance suite against a real S3 server.
    #[test]
    fn server_conformance() {
        let Some(url) = server_url("conformance") else { return };
        let s = S3Storage::new(&url, &[]).unwrap();
        assert_eq!(s.capabilities(), crate::storage::Capabilities::default());
        crate::storage::conformance::run(&s);
        s.remove("m").unwrap();
        assert_eq!(s.list().unwrap(), Vec::<String>::new());
        println!("S3 conformance passed against {url}");
    }

    /// `Checkpoint::open_with` opens the location with the context's storage options (here a
    /// wrong secret, which the server refuses), `Checkpoint::open` with the environment's.
    #[test]
    fn server_checkpoint_open_with_context_options() {
        use crate::{Checkpoint, Context, SaveOptions, State, TensorView};
        let Some(url) = server_url("open-with") else { return };
        let v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let mut st = State::new();
        st.add_tensor("w", TensorView::from_slice(&v, &[1000]).unwrap()).unwrap();
        crate::save(&Context::local(), &st, &url, &SaveOptions::default()).unwrap();
        let good = Checkpoint::open(&url).unwrap();
        assert_eq!(good.keys().map(|k| k.fqn).collect::<Vec<_>>(), ["w"]);
        let ctx = Context::local();
        ctx.set_storage_option("aws_secret_access_key", "not-the-secret");
        let err = Checkpoint::open_with(&ctx, &url).err().expect("a wrong secret is refused");
        assert!(err.message().contains(&url), "{err}");
        let refused = ["403", "Forbidden", "SignatureDoesNotMatch", "AccessDenied"];
        assert!(refused.iter().any(|r| err.message().contains(r)), "{err}");
        let ctx = Context::local();
        ctx.set_storage_option("aws_region", "us-east-1");
        let opened = Checkpoint::open_with(&ctx, &url).unwrap();
        assert_eq!(opened.keys().map(|k| k.fqn).collect::<Vec<_>>(), ["w"]);
        println!("Checkpoint::open_with applied the context's storage options against {url}");
    }
}
