//! The backup store's URL (`--backup-store`, `backup_store` in the config file): where the
//! store is, without its credentials. One parser serves the daemon's flags (so a bad URL is a
//! usage error at start, before anything opens) and the engine that opens the store.
//!
//! ```text
//! file:///ABS/PATH | file://localhost/ABS/PATH | file://REL/PATH   a local directory
//! s3://BUCKET[/PREFIX]?region=R[&endpoint=http(s)://HOST[:PORT]]   S3 (endpoint: AWS's for R)
//! obs://BUCKET[/PREFIX]?endpoint=https://obs.REGION.myhuaweicloud.com   Huawei Cloud OBS
//! ```
//! Query values may be percent-encoded. OBS takes no `region`: its endpoint names the region.
//! A relative file path is relative to the daemon's working directory (the default store,
//! `file://<data-dir>/obs`, is one under a relative data dir); the daemon makes it absolute.

use std::fmt;
use std::path::PathBuf;

use crate::error::StoreError;
use crate::object_store::{validate_key, StoreConfig, ENV_ACCESS_KEY, ENV_SECRET_KEY};

/// A parsed store URL. `Display` gives it back in canonical form, which parses to the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A local directory, absolute or relative to the working directory.
    File { path: PathBuf },
    /// An S3-compatible bucket, path-style. `endpoint` None: AWS's endpoint of `region`.
    S3 { bucket: String, prefix: String, endpoint: Option<String>, region: String },
    /// A Huawei Cloud OBS bucket.
    Obs { bucket: String, prefix: String, endpoint: String },
}

impl StoreUrl {
    /// Pure: checks the whole URL, names the first problem.
    pub fn parse(url: &str) -> Result<StoreUrl, StoreError> {
        parse(url).map_err(|why| StoreError::Url { url: url.to_string(), why })
    }

    /// The store's configuration with the given keys (S3 and OBS need both; a file store
    /// none, and its path must be absolute by now).
    pub fn with_keys(&self, access_key: Option<&str>, secret_key: Option<&str>) -> Result<StoreConfig, StoreError> {
        let bad = |why: String| StoreError::Url { url: self.to_string(), why };
        let keys = || match (access_key, secret_key) {
            (Some(a), Some(s)) => Ok((a.to_string(), s.to_string())),
            _ => Err(bad(format!(
                "{} credentials are missing: set {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}",
                self.scheme()
            ))),
        };
        Ok(match self {
            StoreUrl::File { path } if path.is_absolute() => StoreConfig::File { path: path.clone() },
            StoreUrl::File { .. } => return Err(bad("the store needs an absolute path here".into())),
            StoreUrl::S3 { bucket, prefix, endpoint, region } => {
                let (access_key, secret_key) = keys()?;
                StoreConfig::S3 {
                    bucket: bucket.clone(),
                    prefix: prefix.clone(),
                    endpoint: endpoint.clone().unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com")),
                    region: region.clone(),
                    access_key,
                    secret_key,
                }
            }
            StoreUrl::Obs { bucket, prefix, endpoint } => {
                let (access_key, secret_key) = keys()?;
                StoreConfig::Obs {
                    bucket: bucket.clone(),
                    prefix: prefix.clone(),
                    endpoint: endpoint.clone(),
                    access_key,
                    secret_key,
                }
            }
        })
    }

    /// `with_keys` with the keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    pub fn with_env_keys(&self) -> Result<StoreConfig, StoreError> {
        let a = std::env::var(ENV_ACCESS_KEY).ok().filter(|v| !v.is_empty());
        let s = std::env::var(ENV_SECRET_KEY).ok().filter(|v| !v.is_empty());
        self.with_keys(a.as_deref(), s.as_deref())
    }

    fn scheme(&self) -> &'static str {
        match self {
            StoreUrl::File { .. } => "file",
            StoreUrl::S3 { .. } => "s3",
            StoreUrl::Obs { .. } => "obs",
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (bucket, prefix) = match self {
            StoreUrl::File { path } => return write!(f, "file://{}", path.display()),
            StoreUrl::S3 { bucket, prefix, .. } | StoreUrl::Obs { bucket, prefix, .. } => (bucket, prefix),
        };
        write!(f, "{}://{bucket}", self.scheme())?;
        if !prefix.is_empty() {
            write!(f, "/{prefix}")?;
        }
        // '%' and '&' are the only characters a value cannot hold as they are.
        let q = |v: &str| v.replace('%', "%25").replace('&', "%26");
        match self {
            StoreUrl::S3 { endpoint: Some(e), region, .. } => write!(f, "?endpoint={}&region={}", q(e), q(region)),
            StoreUrl::S3 { region, .. } => write!(f, "?region={}", q(region)),
            StoreUrl::Obs { endpoint, .. } => write!(f, "?endpoint={}", q(endpoint)),
            StoreUrl::File { .. } => Ok(()),
        }
    }
}

fn parse(url: &str) -> Result<StoreUrl, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("expected file:///PATH, s3://BUCKET/PREFIX?region=R&endpoint=URL or \
                    obs://BUCKET/PREFIX?endpoint=URL"
            .into());
    };
    if scheme == "file" {
        let path = rest.strip_prefix("localhost/").map(|p| format!("/{p}")).unwrap_or_else(|| rest.to_string());
        if path.is_empty() || path == "/" {
            return Err("no directory after file://".into());
        }
        if path.contains('?') || path.contains('#') {
            return Err("a file:// store takes no query or fragment".into());
        }
        return Ok(StoreUrl::File { path: PathBuf::from(path) });
    }
    if scheme != "s3" && scheme != "obs" {
        return Err(format!("unsupported scheme {scheme:?} (expected file, s3 or obs)"));
    }
    let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
    validate_bucket(bucket)?;
    let prefix = prefix.trim_matches('/');
    if !prefix.is_empty() {
        validate_key(prefix).map_err(|e| format!("invalid key prefix: {e}"))?;
    }
    let (mut endpoint, mut region) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v).ok_or_else(|| format!("bad percent-encoding in {pair:?}"))?;
        if v.is_empty() {
            return Err(format!("{k} has no value"));
        }
        let slot = match k {
            "endpoint" => {
                let host = v.strip_prefix("http://").or_else(|| v.strip_prefix("https://"));
                if host.is_none_or(str::is_empty) {
                    return Err(format!("endpoint {v:?} must be an http:// or https:// URL"));
                }
                &mut endpoint
            }
            "region" if scheme == "s3" => &mut region,
            "region" => return Err("an obs URL takes no region: its endpoint names it".into()),
            other => return Err(format!("unknown parameter {other:?} (expected endpoint or region)")),
        };
        if slot.replace(v).is_some() {
            return Err(format!("{k} given twice"));
        }
    }
    let (bucket, prefix) = (bucket.to_string(), prefix.to_string());
    if scheme == "obs" {
        let endpoint = endpoint.ok_or("an obs URL needs endpoint=https://obs.REGION.myhuaweicloud.com")?;
        return Ok(StoreUrl::Obs { bucket, prefix, endpoint });
    }
    let region = region.ok_or("an s3 URL needs region=R (for Garage, its s3_region)")?;
    Ok(StoreUrl::S3 { bucket, prefix, endpoint, region })
}

/// The S3 (and OBS) bucket naming rules.
fn validate_bucket(bucket: &str) -> Result<(), String> {
    if bucket.len() < 3 || bucket.len() > 63 {
        return Err(format!("bucket name {bucket:?} must be 3 to 63 characters"));
    }
    if !bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        || !bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !bucket.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(format!(
            "bucket name {bucket:?} must be lowercase letters, digits, '.' and '-', starting and ending with a \
             letter or digit"
        ));
    }
    Ok(())
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parsed(url: &str) -> StoreUrl {
        StoreUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn urls() {
        assert_eq!(parsed("file:///srv/obs"), StoreUrl::File { path: "/srv/obs".into() });
        assert_eq!(parsed("file://localhost/srv/obs"), StoreUrl::File { path: "/srv/obs".into() });
        assert_eq!(parsed("file://evs-data/obs"), StoreUrl::File { path: "evs-data/obs".into() });
        let s3 = parsed("s3://evs-backups/a/b/?endpoint=http%3A%2F%2F127.0.0.1%3A3900&region=garage");
        assert_eq!(
            s3,
            StoreUrl::S3 {
                bucket: "evs-backups".into(),
                prefix: "a/b".into(),
                endpoint: Some("http://127.0.0.1:3900".into()),
                region: "garage".into(),
            }
        );
        assert_eq!(s3.to_string(), "s3://evs-backups/a/b?endpoint=http://127.0.0.1:3900&region=garage");
        let obs = parsed("obs://evs-backup/p/?endpoint=https%3A%2F%2Fobs.cn-north-4.myhuaweicloud.com");
        assert_eq!(obs.to_string(), "obs://evs-backup/p?endpoint=https://obs.cn-north-4.myhuaweicloud.com");
        assert_eq!(parsed("s3://bucket-1?region=eu-west-1").to_string(), "s3://bucket-1?region=eu-west-1");
    }

    #[test]
    fn keys_complete_the_configuration() {
        let c = parsed("s3://b12/p?endpoint=http://h:1&region=r").with_keys(Some("GK1"), Some("secret")).unwrap();
        assert_eq!(
            c,
            StoreConfig::S3 {
                bucket: "b12".into(),
                prefix: "p".into(),
                endpoint: "http://h:1".into(),
                region: "r".into(),
                access_key: "GK1".into(),
                secret_key: "secret".into()
            }
        );
        assert!(!format!("{c:?}").contains("secret"));
        let c = parsed("s3://b12?region=eu-west-1").with_keys(Some("a"), Some("s")).unwrap();
        assert!(matches!(c, StoreConfig::S3 { ref endpoint, .. } if endpoint == "https://s3.eu-west-1.amazonaws.com"));
        let c = parsed("obs://b12?endpoint=https://obs.example").with_keys(Some("a"), Some("s")).unwrap();
        assert!(matches!(c, StoreConfig::Obs { ref endpoint, .. } if endpoint == "https://obs.example"));
        let e = parsed("s3://b12?region=r").with_keys(None, Some("s")).unwrap_err().to_string();
        assert!(e.contains("AWS_ACCESS_KEY_ID") && e.contains("s3://b12"), "{e}");
        assert_eq!(
            parsed("file:///srv/obs").with_keys(None, None).unwrap(),
            StoreConfig::File { path: "/srv/obs".into() }
        );
        let e = parsed("file://rel/obs").with_keys(None, None).unwrap_err().to_string();
        assert!(e.contains("absolute path"), "{e}");
    }

    #[test]
    fn bad_urls_name_the_problem() {
        for (url, why) in [
            ("/srv/obs", "expected file:///PATH"),
            ("ftp://host/x", "unsupported scheme \"ftp\""),
            ("file://", "no directory"),
            ("file:///a?b", "no query"),
            ("s3://", "3 to 63"),
            ("s3://Upper?region=r", "lowercase"),
            ("obs://b-?endpoint=https://o", "3 to 63"),
            ("s3://b12/../x?region=r", "invalid key prefix"),
            ("s3://b12/a//x?region=r", "invalid key prefix"),
            ("s3://b12?endpoint=ftp://x&region=r", "http://"),
            ("s3://b12?endpoint=http://&region=r", "http://"),
            ("s3://b12?token=1&region=r", "unknown parameter \"token\""),
            ("s3://b12?region=", "region has no value"),
            ("s3://b12?region=%zz", "percent-encoding"),
            ("s3://b12?region=a&region=b", "region given twice"),
            ("s3://b12", "needs region"),
            ("obs://b12", "needs endpoint"),
            ("obs://b12?endpoint=https://o&region=cn-north-4", "takes no region"),
        ] {
            let e = StoreUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
            assert!(e.contains(url), "{url}: {e}");
        }
    }

    proptest! {
        /// What parses prints back to a URL that parses to the same thing.
        #[test]
        fn canonical_form_round_trips(
            scheme in prop::sample::select(vec!["s3", "obs"]),
            bucket in "[a-z0-9][a-z0-9.-]{1,20}[a-z0-9]",
            prefix in prop::collection::vec("[a-zA-Z0-9_-]{1,8}", 0..3),
            host in "[a-z0-9.]{1,12}(:[0-9]{1,5})?",
            region in prop::option::of("[a-z0-9-]{1,12}"),
        ) {
            let query = match (scheme, &region) {
                ("s3", Some(r)) => format!("region={r}&endpoint=http://{host}"),
                ("s3", None) => "region=r1".to_string(),
                _ => format!("endpoint=https://{host}"),
            };
            let url = format!("{scheme}://{bucket}/{}?{query}", prefix.join("/"));
            let first = StoreUrl::parse(&url).unwrap();
            prop_assert_eq!(StoreUrl::parse(&first.to_string()).unwrap(), first);
        }

        /// Any string: a URL that prints back to itself parsed, or an error that names it.
        #[test]
        fn any_input_parses_or_is_named(s in "(file|s3|obs|x)://[ -~]{0,40}") {
            match StoreUrl::parse(&s) {
                Ok(u) => prop_assert_eq!(StoreUrl::parse(&u.to_string()).unwrap(), u),
                Err(e) => prop_assert!(e.to_string().contains(&format!("{s:?}")), "{}", e),
            }
        }
    }
}
