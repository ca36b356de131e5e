//! Compiles the .proto files with protox (pure Rust, so no system `protoc` is needed) and
//! generates the tonic/prost code from the resulting descriptor set. The encoded descriptor
//! set is also written to OUT_DIR so the daemon can serve it over gRPC reflection.

use std::path::PathBuf;

use prost::Message;

/// Every .proto file of the API, relative to the `proto/` include directory.
const PROTOS: &[&str] = &[
    "evs/v1/volume.proto",
    "evs/v1/snapshot.proto",
    "evs/v1/tenant.proto",
    "evs/v1/job.proto",
    "evs/v1/backup.proto",
    "evs/v1/dr.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed=proto/{p}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("evs_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
