//! TLS: the gRPC API over https (evsctl with --ca-cert), NBD with STARTTLS (qemu-img, qemu-io,
//! nbdinfo, and the raw client with rustls), the policies `nbd_tls = on | require`, and the
//! rule that plain text is only served on loopback unless `allow_plaintext`.
//!
//! Every test makes its own CA and server certificate (rcgen) into the daemon's directory,
//! laid out as qemu's `tls-creds-x509` and libnbd's `tls-certificates` expect (`ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`), and a second CA for the clients that must be refused.

use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use evs_tests::daemon::bin_path;
use evs_tests::nbd_client::consts::*;
use evs_tests::nbd_client::{info_request, Ending, RawConn, Target};
use evs_tests::tools::{format_output, output_with_timeout, run_tool, stderr_text, stdout_text, DEFAULT_TOOL_TIMEOUT};
use evs_tests::util::{assert_bytes_eq, write_sparse_file, Rng, MIB};
use evs_tests::{require_tool, ConnectOptions, Daemon, DaemonOptions, NbdClient, NbdUri, TlsClient};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

/// How long the server may take to react (close a connection, answer an option).
const REACT: Duration = Duration::from_secs(10);

/// A CA and a server certificate it signed, for 127.0.0.1 and localhost.
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

impl Pki {
    fn new(ca_name: &str) -> Pki {
        Pki::with_ips(ca_name, &[])
    }

    /// With more IP addresses in the server certificate than 127.0.0.1.
    fn with_ips(ca_name: &str, ips: &[std::net::IpAddr]) -> Pki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name.push(DnType::CommonName, ca_name);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // qemu checks its CA file: CA:TRUE, and keyCertSign when key usage is given.
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_pem = ca.self_signed(&ca_key).expect("self-sign the CA").pem();
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate().expect("server key");
        let mut srv = CertificateParams::new(Vec::<String>::new()).unwrap();
        srv.distinguished_name.push(DnType::CommonName, "localhost");
        srv.subject_alt_names =
            vec![SanType::IpAddress("127.0.0.1".parse().unwrap()), SanType::DnsName("localhost".try_into().unwrap())];
        srv.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        srv.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = srv.signed_by(&key, &issuer).expect("sign the server certificate").pem();
        Pki { ca: ca_pem, cert, key: key.serialize_pem() }
    }

    /// The files of this PKI under `dir` (relative to the daemon's root).
    fn files(&self, dir: &str) -> Vec<(PathBuf, Vec<u8>)> {
        vec![
            (Path::new(dir).join("ca-cert.pem"), self.ca.clone().into_bytes()),
            (Path::new(dir).join("server-cert.pem"), self.cert.clone().into_bytes()),
            (Path::new(dir).join("server-key.pem"), self.key.clone().into_bytes()),
        ]
    }
}

/// A daemon with a certificate (`pki/`), the API on https, evsctl trusting `pki/ca-cert.pem`,
/// and a second, unrelated CA in `other/ca-cert.pem`. `config` is extra TOML.
fn tls_daemon(config: &str) -> (Daemon, Pki) {
    let pki = Pki::new("evs test CA");
    let other = Pki::new("some other CA");
    let mut files = pki.files("pki");
    files.extend(other.files("other"));
    let d = Daemon::start_with(DaemonOptions {
        args: ["--tls-cert", "pki/server-cert.pem", "--tls-key", "pki/server-key.pem"].map(String::from).to_vec(),
        config: (!config.is_empty()).then(|| config.to_string()),
        api_scheme: Some("https".into()),
        evsctl_args: vec!["--ca-cert".into(), "pki/ca-cert.pem".into()],
        files,
        ..Default::default()
    });
    (d, pki)
}

fn pki_dir(d: &Daemon) -> PathBuf {
    d.root().join("pki")
}

fn other_dir(d: &Daemon) -> PathBuf {
    d.root().join("other")
}

/// `--object tls-creds-x509,...` trusting the CA in `dir`.
fn qemu_tls_object(dir: &Path) -> String {
    format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", dir.display())
}

/// qemu's image options for an NBD export over TCP with TLS (qemu has no nbds:// URI).
fn qemu_nbd_opts(d: &Daemon, export: &str) -> String {
    format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export={export},tls-creds=tls0",
        d.nbd_addr.port()
    )
}

fn export_of(uri: &str) -> String {
    NbdUri::parse(uri).unwrap_or_else(|e| panic!("{e}")).export
}

fn tls_client(pki: &Pki) -> TlsClient {
    TlsClient::new(pki.ca.as_bytes(), "127.0.0.1")
}

/// `evsctl` run in the daemon's root with exactly these arguments (and the admin token).
fn evsctl_raw(d: &Daemon, args: &[&str]) -> std::process::Output {
    let mut c = d.evsctl_bare();
    c.arg("--token").arg(d.token()).args(args);
    output_with_timeout(&mut c, Duration::from_secs(60))
}

/// Asserts a failed evsctl call printed one line on stderr containing every `needle`.
fn assert_one_line_error(out: &std::process::Output, needles: &[&str]) {
    assert!(!out.status.success(), "evsctl should have failed\n{}", format_output(out));
    let err = stderr_text(out);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line:\n{}", format_output(out));
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{}", format_output(out));
    }
}

#[test]
fn evsctl_over_https_creates_attaches_and_snapshots() {
    let (d, _pki) = tls_daemon("");
    assert!(d.endpoint().starts_with("https://"));
    let (tcp, unix) = d.create_volume("tls-api", "16M");
    // nbd_tls defaults to "on" with a certificate; on a loopback listener plain text is
    // allowed, so the URIs stay nbd://.
    assert!(tcp.starts_with("nbd://127.0.0.1:"), "{tcp}");
    assert!(unix.starts_with("nbd+unix:///"), "{unix}");
    let vols = d.list_volumes();
    assert_eq!(vols.len(), 1, "{vols:?}");
    d.evsctl_ok(&["snapshot", "create", "tls-api", "s1"]);
    let snap = d.evsctl_json(&["snapshot", "attach", "tls-api@s1"]);
    assert!(snap["uri"].as_str().unwrap().starts_with("nbd://"), "{snap}");
    assert!(d.log().contains("api_tls=true"), "{}", d.log());
}

#[test]
fn server_reflection_works_over_tls() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let (d, pki) = tls_daemon("");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let services = rt.block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&pki.ca))
            .domain_name("localhost");
        let channel = tonic::transport::Endpoint::from_shared(d.endpoint())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("connect over TLS");
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .expect("reflection call")
            .into_inner();
        match replies.message().await.expect("reflection reply").and_then(|r| r.message_response) {
            Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect::<Vec<_>>(),
            other => panic!("unexpected reflection reply {other:?}"),
        }
    });
    for s in ["evs.v1.VolumeService", "evs.v1.SnapshotService"] {
        assert!(services.iter().any(|x| x == s), "{s} not listed: {services:?}");
    }
}

#[test]
fn evsctl_fails_clearly_on_tls_mismatches() {
    let (d, _pki) = tls_daemon("");
    let https = d.endpoint();
    let http = https.replacen("https://", "http://", 1);

    // http:// against the TLS API.
    let out = evsctl_raw(&d, &["--endpoint", &http, "volume", "list"]);
    assert_one_line_error(&out, &[&http, "https://"]);
    // https:// without a CA to trust.
    let out = evsctl_raw(&d, &["--endpoint", &https, "volume", "list"]);
    assert_one_line_error(&out, &["--ca-cert", &https]);
    // A CA that did not sign the daemon's certificate.
    let out = evsctl_raw(&d, &["--endpoint", &https, "--ca-cert", "other/ca-cert.pem", "volume", "list"]);
    assert_one_line_error(&out, &[&https, "certificate", "other/ca-cert.pem"]);
    // The CA from the environment, and a CA file that is not one.
    let mut c = d.evsctl_bare();
    c.env("EVS_CA_CERT", "other/ca-cert.pem").args(["--token", d.token(), "--endpoint", &https, "volume", "list"]);
    assert_one_line_error(&output_with_timeout(&mut c, Duration::from_secs(60)), &["other/ca-cert.pem"]);
    let out = evsctl_raw(&d, &["--endpoint", &https, "--ca-cert", "pki/server-key.pem", "volume", "list"]);
    assert_one_line_error(&out, &["pki/server-key.pem", "no certificate"]);
    let out = evsctl_raw(&d, &["--endpoint", &https, "--ca-cert", "pki/missing.pem", "volume", "list"]);
    assert_one_line_error(&out, &["pki/missing.pem"]);
    // None of that created anything; the right CA still works.
    let out = evsctl_raw(&d, &["--endpoint", &https, "--ca-cert", "pki/ca-cert.pem", "volume", "list"]);
    assert!(out.status.success(), "{}", format_output(&out));
    assert!(d.list_volumes().is_empty());

    // https:// against a plain-text daemon.
    let plain = Daemon::start();
    let url = plain.endpoint().replacen("http://", "https://", 1);
    let ca = d.root().join("pki/ca-cert.pem");
    let out = evsctl_raw(&plain, &["--endpoint", &url, "--ca-cert", ca.to_str().unwrap(), "volume", "list"]);
    assert_one_line_error(&out, &[&url]);
}

/// A pattern image: random megabytes, a constant-filled range (for `qemu-io read -P`), holes.
fn pattern_image(path: &Path, size: u64, seed: &str) -> Vec<u8> {
    let mut rng = Rng::from_env_or_time(seed);
    let mut pieces = Vec::new();
    let mut off = 0;
    while off < size {
        let len = rng.range(64 << 10, 3 * MIB).min(size - off);
        if rng.chance(3) {
            pieces.push((off, rng.bytes(len as usize)));
        }
        off += len + rng.below(MIB);
    }
    // 0x5a at [4 MiB, 4 MiB + 256 KiB), after the random pieces so it wins.
    pieces.push((4 * MIB, vec![0x5a; 256 << 10]));
    write_sparse_file(path, size, &pieces);
    std::fs::read(path).unwrap()
}

/// Runs qemu-io with the TLS object and image options; must succeed without a failure message.
fn qemu_io_tls(dir: &Path, opts: &str, cmds: &[&str]) -> String {
    let mut c = Command::new(require_tool("qemu-io"));
    c.arg("--object").arg(qemu_tls_object(dir)).arg("--image-opts").arg(opts);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = output_with_timeout(&mut c, DEFAULT_TOOL_TIMEOUT);
    let text = format!("{}\n{}", stdout_text(&out), stderr_text(&out)).to_lowercase();
    if !out.status.success() || text.contains("fail") || text.contains("error") {
        panic!("qemu-io over TLS reported a failure\n{}", format_output(&out));
    }
    text
}

#[test]
fn qemu_img_and_qemu_io_over_nbd_tls() {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let (d, pki) = tls_daemon("nbd_tls = \"require\"\n");
    let size = 48 * MIB;
    let (tcp, unix) = d.create_volume("tls-qemu", "48M");
    assert!(tcp.starts_with("nbds://127.0.0.1:"), "require: the URI says TLS: {tcp}");
    assert!(unix.starts_with("nbds+unix:///"), "{unix}");
    let export = export_of(&tcp);
    let opts = qemu_nbd_opts(&d, &export);
    let object = qemu_tls_object(&pki_dir(&d));

    let src = d.root().join("src.raw");
    let want = pattern_image(&src, size, "tls_qemu_img");
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "--object", &object, "--target-image-opts"])
            .arg(&src)
            .arg(&opts),
    );
    let out = run_tool(
        Command::new("qemu-img")
            .args(["compare", "--object", &object, "--image-opts"])
            .arg(format!("driver=file,filename={}", src.display()))
            .arg(&opts),
    );
    assert!(stdout_text(&out).contains("Images are identical"), "{}", format_output(&out));
    let info =
        run_tool(Command::new("qemu-img").args(["info", "--output=json", "--object", &object, "--image-opts", &opts]));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("qemu-img info JSON");
    assert_eq!(v["virtual-size"].as_u64(), Some(size), "{v}");

    // qemu-io reads the constant range back and writes one of its own.
    qemu_io_tls(&pki_dir(&d), &opts, &["read -P 0x5a 4M 256k", "write -P 0xc3 40M 1M", "read -P 0xc3 40M 1M"]);

    // An independent reader (rustls + the raw client) sees the same bytes.
    let mut c = NbdClient::connect_tls(&tcp, &tls_client(&pki), &ConnectOptions::default()).expect("TLS connect");
    let got = c.read_all(0, size, 4 << 20).expect("read the volume over TLS");
    let mut want = want;
    want[(40 * MIB) as usize..(41 * MIB) as usize].fill(0xc3);
    assert_bytes_eq(&got, &want, 0, "volume over TLS vs the image");
    c.disconnect().expect("disconnect");

    // A plain-text qemu-img is refused, and says why.
    let out = output_with_timeout(
        Command::new("qemu-img").args(["info"]).arg(tcp.replacen("nbds://", "nbd://", 1)),
        DEFAULT_TOOL_TIMEOUT,
    );
    assert!(!out.status.success(), "plain-text qemu-img info should fail\n{}", format_output(&out));
    assert!(stderr_text(&out).contains("TLS"), "{}", format_output(&out));
    // qemu sends the IP address as SNI; rustls's warning about it is kept out of the log.
    assert!(!d.log().contains("WARN rustls"), "{}", d.log());
}

#[test]
fn nbdinfo_over_nbds_and_a_client_trusting_another_ca() {
    require_tool("nbdinfo");
    require_tool("qemu-img");
    let (d, pki) = tls_daemon("nbd_tls = \"require\"\n");
    let (tcp, _) = d.create_volume("tls-nbdinfo", "20M");
    let with_certs = |dir: &Path| format!("{tcp}?tls-certificates={}", dir.display());

    let out = run_tool(Command::new("nbdinfo").arg("--size").arg(with_certs(&pki_dir(&d))));
    assert_eq!(stdout_text(&out).trim(), (20 * MIB).to_string(), "{}", format_output(&out));

    // A client that trusts another CA (libnbd needs a ca-cert.pem there to verify at all).
    let out = output_with_timeout(
        Command::new("nbdinfo").arg("--size").arg(with_certs(&other_dir(&d))),
        DEFAULT_TOOL_TIMEOUT,
    );
    assert!(!out.status.success(), "nbdinfo trusting another CA should fail\n{}", format_output(&out));
    assert!(stderr_text(&out).contains("certificate"), "{}", format_output(&out));
    let opts = qemu_nbd_opts(&d, &export_of(&tcp));
    let out = output_with_timeout(
        Command::new("qemu-img").args(["info", "--object", &qemu_tls_object(&other_dir(&d)), "--image-opts", &opts]),
        DEFAULT_TOOL_TIMEOUT,
    );
    assert!(!out.status.success(), "qemu-img trusting another CA should fail\n{}", format_output(&out));
    let other = Pki::new("yet another CA");
    let e = NbdClient::connect_tls(&tcp, &tls_client(&other), &ConnectOptions::default()).unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer") || e.to_string().contains("certificate"), "{e}");
    // A client expecting another name is refused too.
    let wrong_name = TlsClient::new(pki.ca.as_bytes(), "evs.example");
    let e = NbdClient::connect_tls(&tcp, &wrong_name, &ConnectOptions::default()).unwrap_err();
    assert!(e.to_string().contains("NotValidForName") || e.to_string().contains("certificate"), "{e}");

    // The daemon logged the failures and still serves: nbdcopy (four connections, many
    // requests in flight each) copies an image in and out, byte for byte.
    assert!(d.log().contains("NBD TLS handshake failed"), "{}", d.log());
    require_tool("nbdcopy");
    let src = d.root().join("src.raw");
    let want = pattern_image(&src, 20 * MIB, "tls_nbdcopy");
    run_tool(Command::new("nbdcopy").arg(&src).arg(with_certs(&pki_dir(&d))));
    let back = d.root().join("back.raw");
    run_tool(Command::new("nbdcopy").arg(with_certs(&pki_dir(&d))).arg(&back));
    assert_bytes_eq(&std::fs::read(&back).unwrap(), &want, 0, "nbdcopy round trip over TLS");
}

/// Reads one option reply and checks it is `reply_type` for `option`; returns its message.
fn expect_reply(c: &mut RawConn, option: u32, reply_type: u32) -> String {
    let r = c.read_option_reply().unwrap_or_else(|e| panic!("reply to option {option}: {e}"));
    assert_eq!((r.option, r.reply_type), (option, reply_type), "reply {r:?} ({})", r.message());
    r.message()
}

#[test]
fn require_refuses_plain_text_and_serves_inside_tls() {
    let (d, pki) = tls_daemon("nbd_tls = \"require\"\n");
    let (tcp, _) = d.create_volume("tls-require", "8M");
    let export = export_of(&tcp);
    let targets = [Target::Tcp(d.nbd_addr.to_string()), Target::Unix(d.nbd_socket.clone())];

    for target in &targets {
        // Everything but STARTTLS and ABORT gets TLS_REQD, without leaking the name.
        let mut c = RawConn::connect(target).unwrap();
        c.set_read_timeout(REACT);
        c.start_fixed_newstyle().unwrap();
        for (opt, data) in [
            (OPT_GO, info_request(&export, &[])),
            (OPT_INFO, info_request(&export, &[])),
            (OPT_STRUCTURED_REPLY, vec![]),
            (OPT_LIST, vec![]),
            (0x4242, b"unknown".to_vec()),
        ] {
            c.send_option(opt, &data).unwrap();
            let msg = expect_reply(&mut c, opt, REP_ERR_TLS_REQD);
            assert!(msg.contains("STARTTLS") && !msg.contains(&export), "{msg}");
        }
        // EXPORT_NAME cannot be refused: the connection is closed.
        c.send_option(OPT_EXPORT_NAME, export.as_bytes()).unwrap();
        assert_eq!(c.wait_closed(REACT), Ending::Closed { bytes_before_close: 0 }, "{target:?}");

        // ABORT is acknowledged.
        let mut c = RawConn::connect(target).unwrap();
        c.set_read_timeout(REACT);
        c.start_fixed_newstyle().unwrap();
        c.send_option(OPT_ABORT, &[]).unwrap();
        expect_reply(&mut c, OPT_ABORT, REP_ACK);
    }

    // Inside TLS (over TCP and over the unix socket): STARTTLS again is invalid, the rest
    // works, the data is the data.
    let tls = tls_client(&pki);
    let local = TlsClient::new(pki.ca.as_bytes(), "localhost");
    for (target, tls) in [(&targets[0], &tls), (&targets[1], &local)] {
        let mut c = RawConn::connect(target).unwrap();
        c.set_read_timeout(REACT);
        let hflags = c.start_fixed_newstyle().unwrap();
        c.send_option(OPT_STARTTLS, b"x").unwrap();
        expect_reply(&mut c, OPT_STARTTLS, REP_ERR_INVALID);
        c.start_tls(tls).unwrap_or_else(|e| panic!("STARTTLS over {target:?}: {e}"));
        c.send_option(OPT_STARTTLS, &[]).unwrap();
        let msg = expect_reply(&mut c, OPT_STARTTLS, REP_ERR_INVALID);
        assert!(msg.contains("already"), "{msg}");
        let mut n = NbdClient::negotiate(c, &export, &ConnectOptions::default(), hflags & FLAG_NO_ZEROES != 0)
            .expect("GO inside TLS");
        assert_eq!(n.size(), 8 * MIB);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        n.write(123_457, &data).unwrap();
        n.flush().unwrap();
        assert_bytes_eq(&n.read(123_457, data.len() as u32).unwrap(), &data, 123_457, "read back over TLS");
        n.disconnect().unwrap();
    }

    // TLS 1.2 (the NBD specification's minimum) works too.
    let tls12 = TlsClient::with_versions(pki.ca.as_bytes(), "127.0.0.1", &[&rustls::version::TLS12]);
    let mut n = NbdClient::connect_tls(&tcp, &tls12, &ConnectOptions::default()).expect("TLS 1.2");
    assert_eq!(n.read(0, 4096).unwrap().len(), 4096);
    n.disconnect().unwrap();

    // A plain-text client with the export name gets nothing.
    let e = NbdClient::connect(&tcp.replacen("nbds://", "nbd://", 1)).unwrap_err();
    assert!(e.to_string().contains("TLS_REQD"), "{e}");
}

#[test]
fn on_mode_lets_loopback_clients_choose() {
    require_tool("nbdinfo");
    let (d, pki) = tls_daemon("");
    let (tcp, unix) = d.create_volume("tls-on", "8M");
    assert!(tcp.starts_with("nbd://"), "{tcp}");

    // Plain text over loopback TCP and the unix socket.
    let mut plain = NbdClient::connect(&tcp).expect("plain text on loopback");
    plain.write(4096, &[0xa5; 8192]).unwrap();
    plain.flush().unwrap();
    let mut over_unix = NbdClient::connect(&unix).expect("plain text on the unix socket");
    assert_eq!(over_unix.read(4096, 8192).unwrap(), vec![0xa5; 8192]);
    over_unix.disconnect().unwrap();

    // TLS on the same listener; both sessions see each other's writes.
    let mut tls = NbdClient::connect_tls(&tcp, &tls_client(&pki), &ConnectOptions::default()).expect("STARTTLS");
    assert_eq!(tls.read(4096, 8192).unwrap(), vec![0xa5; 8192]);
    tls.write(1 << 20, b"written over TLS").unwrap();
    tls.flush().unwrap();
    assert_eq!(plain.read(1 << 20, 16).unwrap(), b"written over TLS");
    tls.disconnect().unwrap();
    plain.disconnect().unwrap();

    // libnbd in both modes.
    let out = run_tool(Command::new("nbdinfo").arg("--size").arg(&tcp));
    assert_eq!(stdout_text(&out).trim(), (8 * MIB).to_string());
    let nbds = format!("{}?tls-certificates={}", tcp.replacen("nbd://", "nbds://", 1), pki_dir(&d).display());
    let out = run_tool(Command::new("nbdinfo").arg("--size").arg(&nbds));
    assert_eq!(stdout_text(&out).trim(), (8 * MIB).to_string());
}

#[test]
fn detach_and_sigterm_end_tls_connections() {
    let (mut d, pki) = tls_daemon("nbd_tls = \"require\"\n");
    let (tcp, _) = d.create_volume("tls-detach", "8M");
    let tls = tls_client(&pki);

    let mut c = NbdClient::connect_tls(&tcp, &tls, &ConnectOptions::default()).expect("TLS connect");
    c.write(0, b"before detach").unwrap();
    c.flush().unwrap();
    d.evsctl_ok(&["volume", "detach", "tls-detach"]);
    c.set_timeout(REACT);
    assert!(c.read(0, 13).is_err(), "a detached TLS connection must not serve");
    assert!(matches!(c.conn.wait_closed(REACT), Ending::Closed { .. }));

    // SIGTERM: an idle TLS connection is closed and the daemon exits 0; what was written
    // over TLS is there after the restart.
    let tcp = d.attach("tls-detach");
    let mut c = NbdClient::connect_tls(&tcp, &tls, &ConnectOptions::default()).expect("TLS connect");
    c.write(8192, b"before sigterm").unwrap();
    let status = d.terminate();
    assert!(status.success(), "evs-target exited with {status}\n{}", d.log());
    c.set_timeout(REACT);
    assert!(matches!(c.conn.wait_closed(REACT), Ending::Closed { .. }));
    d.restart();
    let mut c = NbdClient::connect_tls(&tcp, &tls, &ConnectOptions::default()).expect("TLS connect after restart");
    assert_eq!(c.read(0, 13).unwrap(), b"before detach");
    assert_eq!(c.read(8192, 14).unwrap(), b"before sigterm");
    c.disconnect().unwrap();
}

/// How a start that did not get ready ended.
#[derive(Debug)]
struct Refusal {
    code: Option<i32>,
    log: String,
    created_data_dir: bool,
}

/// An `evs-target` started by hand (the harness binds loopback only), with its stderr in a file.
struct Manual {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Manual {
    /// Runs `evs-target ARGS` in a fresh directory (`files` written there first); waits until it
    /// is ready (`Ok`) or has exited (`Err`).
    fn run(args: &[&str], files: &[(PathBuf, Vec<u8>)]) -> Result<Manual, Refusal> {
        let dir = tempfile::Builder::new().prefix("evs-test-").tempdir().unwrap();
        for (rel, contents) in files {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, contents).unwrap();
        }
        let log = dir.path().join("stderr.log");
        let child = Command::new(bin_path("evs-target"))
            .args(["--data-dir", "data", "--metrics-listen", "127.0.0.1:0"])
            .args(args)
            .current_dir(dir.path())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start evs-target");
        let mut m = Manual { child: Some(child), log, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = m.child.as_mut().unwrap().try_wait().unwrap() {
                m.child = None;
                return Err(Refusal { code: status.code(), log: m.log(), created_data_dir: m.data_dir_exists() });
            }
            if m.log().contains("evs-target ready") {
                return Ok(m);
            }
            assert!(Instant::now() < deadline, "evs-target neither ready nor gone:\n{}", m.log());
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn data_dir_exists(&self) -> bool {
        self._dir.path().join("data").exists()
    }

    /// A `key=ADDR` field of the ready line.
    fn addr(&self, key: &str) -> SocketAddr {
        let log = self.log();
        let line = log.lines().find(|l| l.contains("evs-target ready")).unwrap();
        let v = line.split(&format!(" {key}=")).nth(1).unwrap().split_whitespace().next().unwrap();
        v.parse().unwrap_or_else(|_| panic!("{key}={v} in {line}"))
    }

    fn root(&self) -> &Path {
        self._dir.path()
    }
}

impl Drop for Manual {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn refused(args: &[&str], files: &[(PathBuf, Vec<u8>)], needles: &[&str]) {
    match Manual::run(args, files) {
        Ok(m) => panic!("evs-target {args:?} started but should not have:\n{}", m.log()),
        Err(Refusal { code, log, created_data_dir }) => {
            assert!(code.is_some_and(|c| c != 0), "exit code {code:?}\n{log}");
            for n in needles {
                assert!(log.contains(n), "the error lacks {n:?}:\n{log}");
            }
            // Refused before anything was touched.
            assert!(!created_data_dir, "a refused start created the data directory\n{log}");
            assert_eq!(log.trim_end().lines().count(), 1, "one line of error:\n{log}");
        }
    }
}

/// This host's address on its default route (not loopback), to be a non-loopback peer.
fn non_loopback_ip() -> std::net::IpAddr {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    // No packet is sent: connecting a UDP socket only picks the route and source address.
    s.connect("192.0.2.1:9")
        .or_else(|_| s.connect("203.0.113.1:9"))
        .expect("this test needs a non-loopback IPv4 address with a route (to connect as a remote peer)");
    let ip = s.local_addr().unwrap().ip();
    assert!(!ip.is_loopback() && !ip.is_unspecified(), "no non-loopback address: {ip}");
    ip
}

#[test]
fn plain_text_is_refused_off_loopback_unless_allowed() {
    let loopback = ["--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"];
    // The API in plain text on a wildcard address.
    refused(
        &["--nbd-listen", "127.0.0.1:0", "--api-listen", "0.0.0.0:0"],
        &[],
        &["the gRPC API would serve plain text on 0.0.0.0:0", "--api-listen", "tls_cert", "allow_plaintext = true"],
    );
    // NBD in plain text on the IPv6 wildcard, named by the config file's line.
    let cfg = vec![(PathBuf::from("evs.toml"), b"az = \"az1\"\nnbd_listen = \"[::]:0\"\n".to_vec())];
    refused(
        &["--api-listen", "127.0.0.1:0", "--config", "evs.toml"],
        &cfg,
        &["NBD would serve plain text on [::]:0", "evs.toml:2", "nbd_tls"],
    );

    refused(&["--nbd-listen", "0.0.0.0:0", "--api-listen", "127.0.0.1:0"], &[], &["NBD would serve plain text"]);

    // allow_plaintext = true accepts it.
    let cfg = vec![(PathBuf::from("evs.toml"), b"allow_plaintext = true\n".to_vec())];
    let m = Manual::run(&["--nbd-listen", "0.0.0.0:0", "--api-listen", "0.0.0.0:0", "--config", "evs.toml"], &cfg)
        .unwrap_or_else(|r| panic!("allow_plaintext: {r:?}"));
    assert!(m.data_dir_exists());
    drop(m);
    // Loopback needs nothing.
    drop(Manual::run(&loopback, &[]).unwrap_or_else(|r| panic!("loopback: {r:?}")));
}

#[test]
fn tls_on_wildcard_listeners_requires_tls_from_remote_peers() {
    // This host as a remote peer: its address on the default route, in the certificate too.
    let remote_ip = non_loopback_ip();
    let pki = Pki::with_ips("evs test CA", &[remote_ip]);
    let files = pki.files("pki");
    let m = Manual::run(
        &[
            "--nbd-listen",
            "0.0.0.0:0",
            "--api-listen",
            "0.0.0.0:0",
            "--tls-cert",
            "pki/server-cert.pem",
            "--tls-key",
            "pki/server-key.pem",
        ],
        &files,
    )
    .unwrap_or_else(|r| panic!("TLS on wildcard listeners: {r:?}"));
    let api = format!("https://{}", SocketAddr::new(remote_ip, m.addr("api").port()));
    let nbd_port = m.addr("nbd").port();
    let evsctl = |args: &[&str]| {
        let mut c = Command::new(bin_path("evsctl"));
        c.current_dir(m.root()).env_remove("EVS_TOKEN").env_remove("EVS_ENDPOINT").env_remove("EVS_CA_CERT");
        c.args(["--endpoint", &api, "--ca-cert", "pki/ca-cert.pem", "--token"])
            .arg(std::fs::read_to_string(m.root().join("data/admin.token")).unwrap().trim())
            .args(args);
        run_tool(&mut c)
    };
    evsctl(&["volume", "create", "wild", "--size", "4M"]);
    let out = evsctl(&["--output", "json", "volume", "attach", "wild"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let uri = v["uri"].as_str().unwrap().to_string();
    // A non-loopback listener with nbd_tls = on: remote peers must use TLS, so the URI says
    // so; its host is the address the API call came in on (seen through TLS).
    let remote = SocketAddr::new(remote_ip, nbd_port);
    assert_eq!(uri, format!("nbds://{remote}/{}", export_of(&uri)));
    let export = export_of(&uri);

    // A loopback peer may stay in plain text...
    let c = NbdClient::connect(&format!("nbd://127.0.0.1:{nbd_port}/{export}")).expect("loopback plain text");
    assert_eq!(c.size(), 4 * MIB);
    c.disconnect().unwrap();
    // ...a peer on another address may not, but may upgrade.
    let mut raw = RawConn::connect(&Target::Tcp(remote.to_string())).unwrap();
    raw.set_read_timeout(REACT);
    let hflags = raw.start_fixed_newstyle().unwrap();
    raw.send_option(OPT_GO, &info_request(&export, &[])).unwrap();
    expect_reply(&mut raw, OPT_GO, REP_ERR_TLS_REQD);
    raw.start_tls(&TlsClient::new(pki.ca.as_bytes(), &remote_ip.to_string())).expect("STARTTLS from a remote peer");
    let n = NbdClient::negotiate(raw, &export, &ConnectOptions::default(), hflags & FLAG_NO_ZEROES != 0).unwrap();
    assert_eq!(n.size(), 4 * MIB);
    n.disconnect().unwrap();
}

#[test]
fn bad_tls_files_stop_the_start_naming_the_file() {
    let pki = Pki::new("evs test CA");
    let other = Pki::new("other CA");
    let mut files = pki.files("pki");
    files.push((PathBuf::from("pki/garbage.pem"), b"this is not PEM\n".to_vec()));
    files.push((PathBuf::from("pki/other-key.pem"), other.key.clone().into_bytes()));
    let listen = ["--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"];
    let with = |extra: &[&'static str]| [&listen[..], extra].concat();

    refused(&with(&["--tls-cert", "pki/server-cert.pem"]), &files, &["--tls-cert is set but tls_key is not"]);
    refused(&with(&["--nbd-tls", "require"]), &files, &["needs a certificate"]);
    refused(
        &with(&["--tls-cert", "pki/nope.pem", "--tls-key", "pki/server-key.pem"]),
        &files,
        &["cannot read the TLS certificate pki/nope.pem"],
    );
    refused(
        &with(&["--tls-cert", "pki/garbage.pem", "--tls-key", "pki/server-key.pem"]),
        &files,
        &["TLS certificate pki/garbage.pem", "no certificate"],
    );
    refused(
        &with(&["--tls-cert", "pki/server-cert.pem", "--tls-key", "pki/server-cert.pem"]),
        &files,
        &["TLS key pki/server-cert.pem", "no private key"],
    );
    refused(
        &with(&["--tls-cert", "pki/server-cert.pem", "--tls-key", "pki/other-key.pem"]),
        &files,
        &["pki/other-key.pem", "does not belong to the certificate pki/server-cert.pem"],
    );
}
