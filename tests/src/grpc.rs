//! A typed gRPC client of the daemon's API (the generated tonic clients of `evs-proto`), for
//! tests that call every RPC directly, with whatever metadata they choose, and look at the
//! exact status code and message.

use std::future::Future;
use std::time::Duration;

use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

pub use evs_proto::v1 as pb;

use crate::Daemon;

/// The credentials a call carries.
#[derive(Debug, Clone)]
pub enum Auth {
    /// No `authorization` metadata at all.
    None,
    /// `authorization: Bearer TOKEN` (a tenant's token).
    Bearer(String),
    /// What one daemon sends another for a DR group: the group's secret as the bearer token
    /// and `x-evs-group: TENANT/GROUP`.
    Group { key: String, secret: String },
}

impl Auth {
    pub fn bearer(token: &str) -> Auth {
        Auth::Bearer(token.to_string())
    }
}

/// `m` with `auth`'s metadata.
pub fn req<T>(auth: &Auth, m: T) -> Request<T> {
    let mut r = Request::new(m);
    r.set_timeout(Duration::from_secs(60));
    let md = r.metadata_mut();
    match auth {
        Auth::None => {}
        Auth::Bearer(t) => {
            md.insert("authorization", MetadataValue::try_from(format!("Bearer {t}")).expect("a token is ASCII"));
        }
        Auth::Group { key, secret } => {
            md.insert("authorization", MetadataValue::try_from(format!("Bearer {secret}")).expect("ASCII secret"));
            md.insert("x-evs-group", MetadataValue::try_from(key.as_str()).expect("ASCII group key"));
        }
    }
    r
}

/// A current-thread runtime and a channel to one daemon's API (plain text).
pub struct Grpc {
    rt: tokio::runtime::Runtime,
    ch: Channel,
}

impl Grpc {
    pub fn connect(d: &Daemon) -> Grpc {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        let ch = rt.block_on(async {
            Endpoint::from_shared(d.endpoint())
                .expect("the daemon's endpoint is a URI")
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .unwrap_or_else(|e| panic!("connect to the API at {}: {e}", d.endpoint()))
        });
        Grpc { rt, ch }
    }

    pub fn channel(&self) -> Channel {
        self.ch.clone()
    }

    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

/// Every RPC of the API as `Service/Method` (the audit log's spelling), from the descriptor
/// set the daemon serves over reflection: a new RPC shows up here without anyone listing it.
pub fn all_methods() -> Vec<String> {
    let fds = prost_types::FileDescriptorSet::decode(evs_proto::FILE_DESCRIPTOR_SET).expect("the descriptor set");
    let mut out = Vec::new();
    for f in &fds.file {
        if f.package() != "evs.v1" {
            continue;
        }
        for s in &f.service {
            for m in &s.method {
                out.push(format!("{}/{}", s.name(), m.name()));
            }
        }
    }
    out.sort();
    out
}

/// A boxed call's future (current-thread runtime: no Send needed).
pub type Fut = std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::Status>>>>;
/// One RPC with a fixed request, callable with any credentials, any number of times.
pub type Call = Box<dyn Fn(Channel, Auth) -> Fut>;

/// A [`Call`] of `Client.method(request)`: `call!(VolumeServiceClient.get_volume(req))`. The
/// request is built once and cloned at each call; only the response's status is kept.
#[macro_export]
macro_rules! call {
    ($client:ident . $method:ident ( $m:expr )) => {{
        let m = $m;
        Box::new(move |ch: tonic::transport::Channel, auth: $crate::grpc::Auth| -> $crate::grpc::Fut {
            let m = m.clone();
            Box::pin(async move { $client::new(ch).$method($crate::grpc::req(&auth, m)).await.map(|_| ()) })
        }) as $crate::grpc::Call
    }};
}
