//! The S3 test server (a single-node Garage that `scripts/garage.sh start` runs and
//! scripts/test.sh starts before the suite): where it is, and a fresh prefix per test.

/// The S3 endpoint, region, bucket and keys of the test server.
#[derive(Debug, Clone)]
pub struct S3Env {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

impl S3Env {
    /// The server from the environment; panics, naming how to start one, when it is absent
    /// (a test that needs S3 fails rather than skips).
    pub fn get() -> S3Env {
        let var = |k: &str| {
            std::env::var(k).unwrap_or_else(|_| {
                panic!(
                    "{k} is not set: this test needs the S3 test server. Run the suite with scripts/test.sh, or \
                     start it with `eval \"$(scripts/garage.sh start)\"`"
                )
            })
        };
        S3Env {
            endpoint: var("EVS_TEST_S3_ENDPOINT"),
            region: var("EVS_TEST_S3_REGION"),
            bucket: var("EVS_TEST_S3_BUCKET"),
            access_key: var("AWS_ACCESS_KEY_ID"),
            secret_key: var("AWS_SECRET_ACCESS_KEY"),
        }
    }

    /// A `--backup-store` URL of a prefix of its own (tests share the bucket).
    pub fn store_url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}?endpoint={}&region={}", self.bucket, self.endpoint, self.region)
    }

    /// A prefix no other test uses.
    pub fn unique_prefix(what: &str) -> String {
        let mut b = [0u8; 6];
        std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).unwrap();
        format!("t-{what}-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
    }
}
