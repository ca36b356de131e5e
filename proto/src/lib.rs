//! The EVS engine's gRPC API: messages and tonic client/server code generated from
//! `proto/evs/v1/*.proto` at build time (see `build.rs`).

/// Version 1 of the API (protobuf package `evs.v1`).
pub mod v1 {
    tonic::include_proto!("evs.v1");
}

/// The encoded `FileDescriptorSet` of every API file (with imports), for gRPC server
/// reflection, so generic clients such as `grpcurl` can list and call the services.
/// HTTP/2 receive window of one stream (bytes) for both ends of the API: a replication cycle
/// streams 2 MiB batches, and HTTP/2's default of 64 KiB would make every batch wait for 32
/// window updates.
pub const STREAM_WINDOW: u32 = 16 << 20;
/// HTTP/2 receive window of a whole connection (bytes).
pub const CONNECTION_WINDOW: u32 = 32 << 20;

pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/evs_descriptor.bin"));

#[cfg(test)]
mod tests {
    #[test]
    fn descriptor_set_holds_the_volume_service() {
        let fds = super::FILE_DESCRIPTOR_SET;
        let has = |needle: &[u8]| fds.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"evs/v1/volume.proto"));
        assert!(has(b"VolumeService"));
        assert!(has(b"AttachVolume"));
        assert!(has(b"evs/v1/job.proto"));
        assert!(has(b"JobService"));
        assert!(has(b"CancelJob"));
    }
}
