//! gRPC server reflection, as grpcurl uses it (`grpcurl -plaintext HOST:PORT list`, then
//! `describe` to learn the methods and messages it needs to call them): every EVS service is
//! listed, and the file descriptor of each is served with its methods.

use std::time::Duration;

use evs_tests::Daemon;
use prost::Message;
use tokio_stream::StreamExt;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

const SERVICES: [&str; 5] = [
    "evs.v1.VolumeService",
    "evs.v1.SnapshotService",
    "evs.v1.TenantService",
    "evs.v1.ServerService",
    "evs.v1.AuditService",
];

async fn ask(c: &mut ServerReflectionClient<tonic::transport::Channel>, req: MessageRequest) -> MessageResponse {
    let outbound = tokio_stream::iter([ServerReflectionRequest { host: String::new(), message_request: Some(req) }]);
    let mut inbound = c.server_reflection_info(outbound).await.expect("reflection call").into_inner();
    let resp = inbound.next().await.expect("one response").expect("response ok");
    resp.message_response.expect("a message response")
}

#[test]
fn reflection_lists_and_describes_every_service() {
    let d = Daemon::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(d.endpoint())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to the API");
        let mut c = ServerReflectionClient::new(channel);

        // `grpcurl list`: reflection needs no token (it only describes the API).
        let MessageResponse::ListServicesResponse(list) =
            ask(&mut c, MessageRequest::ListServices(String::new())).await
        else {
            panic!("ListServices answered with something else");
        };
        let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        for s in SERVICES {
            assert!(names.contains(&s), "reflection lists {names:?}, not {s}");
        }

        // `grpcurl describe`: the file defining each service, with its methods.
        for (service, method) in [
            ("evs.v1.VolumeService", "CreateVolume"),
            ("evs.v1.TenantService", "CreateTenant"),
            ("evs.v1.ServerService", "CreateServer"),
            ("evs.v1.AuditService", "ListAudit"),
            ("evs.v1.SnapshotService", "DiffSnapshots"),
        ] {
            let MessageResponse::FileDescriptorResponse(files) =
                ask(&mut c, MessageRequest::FileContainingSymbol(service.to_string())).await
            else {
                panic!("FileContainingSymbol({service}) answered with something else");
            };
            let short = service.rsplit('.').next().unwrap();
            let found = files.file_descriptor_proto.iter().any(|bytes| {
                let fd = prost_types::FileDescriptorProto::decode(bytes.as_slice()).expect("a FileDescriptorProto");
                fd.service.iter().any(|s| s.name() == short && s.method.iter().any(|m| m.name() == method))
            });
            assert!(found, "no descriptor of {service} with method {method}");
        }
    });
}
