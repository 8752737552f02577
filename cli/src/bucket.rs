//! The cold tier's object store from the settings: the backend the bucket URL names, its
//! credentials from each cloud's usual sources, then the wrappers (fault injection when a
//! test asks for it, retry with backoff), and the start-up check.

use std::sync::Arc;
use std::time::Duration;

use tidepool_tiering::store::azure::{AzureConfig, AzureCredential, AzureStore};
use tidepool_tiering::store::fault::{FaultConfig, Faulty};
use tidepool_tiering::{
    BucketUrl, LocalStore, ObjectError, ObjectStore, RetryConfig, Retrying, S3Config, S3Store, parse_bucket_url,
};

use crate::datadir::anyhow_free::Result;
use crate::settings::Settings;

/// The backend alone, without wrappers (the start-up check uses it so that a dead endpoint
/// is reported at once instead of after the retries).
pub async fn open_backend(s: &Settings) -> Result<Arc<dyn ObjectStore>> {
    let url = s.bucket_url();
    Ok(match parse_bucket_url(&url)? {
        BucketUrl::File(path) => Arc::new(LocalStore::new(path)?),
        BucketUrl::S3 { bucket, prefix } => {
            let mut cfg = S3Config::new(bucket, prefix);
            if let Some(e) = &s.bucket_endpoint {
                cfg = cfg.with_endpoint(e.clone());
            }
            if let Some(r) = &s.bucket_region {
                cfg = cfg.with_region(r.clone());
            }
            // Credentials: the AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile,
            // web identity, IMDS).
            Arc::new(S3Store::new(cfg).await?)
        }
        BucketUrl::Azure { container, prefix } => {
            let account = std::env::var("AZURE_STORAGE_ACCOUNT")
                .map_err(|_| "an az:// bucket needs AZURE_STORAGE_ACCOUNT (the storage account name)")?;
            let credential = if let Ok(sas) = std::env::var("AZURE_STORAGE_SAS_TOKEN") {
                AzureCredential::Sas(sas)
            } else if let Ok(key) = std::env::var("AZURE_STORAGE_KEY") {
                AzureCredential::SharedKey(key)
            } else {
                AzureCredential::Default
            };
            let mut cfg = AzureConfig::new(account, container, credential);
            cfg.prefix = prefix;
            cfg.endpoint = s.bucket_endpoint.clone();
            Arc::new(AzureStore::new(cfg)?)
        }
    })
}

/// The backend wrapped for use: faults (tests only), then retries with backoff and jitter.
pub fn wrap(s: &Settings, backend: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
    let inner: Arc<dyn ObjectStore> = if s.fault_fail_rate > 0.0 || s.fault_delay_rate > 0.0 {
        tracing::warn!(
            fail_rate = s.fault_fail_rate,
            delay_rate = s.fault_delay_rate,
            "object store fault injection on"
        );
        Arc::new(Faulty::new(
            backend,
            FaultConfig {
                fail_rate: s.fault_fail_rate,
                delay_rate: s.fault_delay_rate,
                delay: Duration::from_millis(50),
                seed: rand::random(),
            },
        ))
    } else {
        backend
    };
    Arc::new(Retrying::new(inner, RetryConfig::default()))
}

/// Start-up check: one listing. Refused credentials or a missing bucket stop the start with
/// one clear error; an unreachable store only warns (writes go on to NVMe up to the dirty
/// limit, and tiering catches up when it is back).
pub async fn check(backend: &Arc<dyn ObjectStore>) -> Result<()> {
    match backend.list("manifests/", None, 1).await {
        Ok(_) => Ok(()),
        Err(e @ (ObjectError::Auth(_) | ObjectError::NoBucket(_) | ObjectError::Invalid(_))) => {
            Err(format!("object store {}: {e}", backend.describe()).into())
        }
        Err(e) => {
            tracing::warn!(bucket = %backend.describe(), error = %e, "object store unreachable at start; writes stay on NVMe until it is back");
            Ok(())
        }
    }
}
