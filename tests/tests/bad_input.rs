//! Malformed handshakes and requests from raw sockets. Each gets the protocol's error reply or
//! a closed connection, never a crash, never a leaked export name; meanwhile a well-behaved
//! client keeps reading and writing correctly and the daemon stays up.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use evs_tests::nbd_client::consts::*;
use evs_tests::nbd_client::{self, info_request, read_info_replies, Ending, RawConn, Target};
use evs_tests::util::{assert_bytes_eq, Rng, MIB};
use evs_tests::{ConnectOptions, Daemon, NbdClient, NbdUri};

/// How long the server may take to react to a bad input.
const REACT: Duration = Duration::from_secs(10);
const SIZE: u64 = 64 * MIB;

type CaseResult = Result<(), String>;
type Case = (&'static str, Box<dyn FnMut() -> CaseResult>);

fn ctx<T>(r: nbd_client::Result<T>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

fn raw(target: &Target) -> Result<RawConn, String> {
    let c = RawConn::connect(target).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(REACT);
    Ok(c)
}

fn expect_closed(c: &mut RawConn, what: &str) -> CaseResult {
    match c.wait_closed(REACT) {
        Ending::Closed { .. } => Ok(()),
        Ending::StillOpen { bytes_received } => {
            Err(format!("{what}: connection still open after {REACT:?} ({bytes_received} bytes received meanwhile)"))
        }
    }
}

/// An option reply that must be an error, or the connection closed.
fn expect_option_error_or_close(c: &mut RawConn, what: &str) -> CaseResult {
    match c.read_option_reply() {
        Ok(r) if r.is_error() => Ok(()),
        Ok(r) => Err(format!("{what}: got reply type {:#x} instead of an error", r.reply_type)),
        Err(e) if e.is_closed() => Ok(()),
        Err(e) => Err(format!("{what}: neither an error reply nor a closed connection: {e}")),
    }
}

/// A request that must fail with `want` (any errno if None), on a connection that must keep
/// working afterwards.
fn expect_errno(r: nbd_client::Result<()>, want: Option<u32>, what: &str) -> CaseResult {
    match r {
        Ok(()) => Err(format!("{what}: succeeded, expected an error reply")),
        Err(e) => match (e.errno(), want) {
            (Some(got), Some(w)) if got == w => Ok(()),
            (Some(_), None) => Ok(()),
            (Some(got), Some(w)) => Err(format!(
                "{what}: error {got} ({}), expected {w} ({})",
                nbd_client::errno_name(got),
                nbd_client::errno_name(w)
            )),
            (None, _) => Err(format!("{what}: {e}")),
        },
    }
}

fn still_works(c: &mut NbdClient, what: &str) -> CaseResult {
    let data = vec![0x5au8; 4096];
    ctx(c.write(20 * MIB, &data), &format!("{what}: write afterwards"))?;
    let got = ctx(c.read(20 * MIB, 4096), &format!("{what}: read afterwards"))?;
    if got != data {
        return Err(format!("{what}: connection returns wrong data afterwards"));
    }
    Ok(())
}

fn client(uri: &str, structured: bool) -> Result<NbdClient, String> {
    let c = NbdClient::connect_with(uri, &ConnectOptions { structured_replies: structured, ..Default::default() })
        .map_err(|e| format!("connect: {e}"))?;
    c.set_timeout(REACT);
    Ok(c)
}

/// The background client: random writes and read-backs in [32 MiB, 64 MiB) until told to stop.
fn good_client(uri: String, stop: Arc<AtomicBool>, seed: u64) -> Result<u64, String> {
    let mut c = NbdClient::connect(&uri).map_err(|e| format!("good client: connect: {e}"))?;
    let mut rng = Rng::new(seed);
    let mut ops = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let off = 32 * MIB + rng.below(32 * MIB - 70_000);
        let len = rng.range(1, 70_000) as usize;
        let data = rng.bytes(len);
        c.write(off, &data).map_err(|e| format!("good client: write after {ops} ops: {e}"))?;
        let got = c.read(off, data.len() as u32).map_err(|e| format!("good client: read after {ops} ops: {e}"))?;
        if got != data {
            return Err(format!("good client: read back wrong data at {off} after {ops} ops"));
        }
        ops += 1;
    }
    c.disconnect().map_err(|e| format!("good client: disconnect: {e}"))?;
    Ok(ops)
}

#[test]
fn malformed_input_gets_errors_and_never_disturbs_other_clients() {
    let mut d = Daemon::start();
    let (tcp, unix) = d.create_volume("bad-input", "64M");
    let uri = NbdUri::parse(&tcp).unwrap();
    let token = uri.export.clone();
    let target = uri.target.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let (unix, stop) = (unix.clone(), stop.clone());
        thread::spawn(move || good_client(unix, stop, 99))
    };
    // Connections that just sit there during all of it: before the greeting is read, after the
    // client flags, in transmission, and in the middle of a WRITE payload.
    let mut idle: Vec<RawConn> = Vec::new();
    idle.push(RawConn::connect(&target).expect("idle connect"));
    let mut c = RawConn::connect(&target).expect("idle connect");
    c.start_fixed_newstyle().expect("idle handshake");
    idle.push(c);
    let mut c = NbdClient::connect(&tcp).expect("idle client");
    c.send_request(0, CMD_WRITE, 0, 1 << 20, &[1u8; 1000]).expect("half a write");
    idle.push(c.conn);
    let idle_client = NbdClient::connect(&tcp).expect("idle client");

    let mut failures: Vec<String> = Vec::new();
    let mut rng = Rng::new(5);
    let mut cases: Vec<Case> = Vec::new();

    {
        let target = target.clone();
        cases.push((
            "unknown client flags",
            Box::new(move || {
                let mut c = raw(&target)?;
                ctx(c.read_greeting(), "greeting")?;
                ctx(c.send_client_flags(0xdead_beec), "send flags")?;
                expect_closed(&mut c, "after unknown client flags")
            }),
        ));
    }
    {
        let target = target.clone();
        let junk = rng.bytes(64);
        cases.push((
            "garbage instead of client flags",
            Box::new(move || {
                let mut c = raw(&target)?;
                ctx(c.read_greeting(), "greeting")?;
                let mut j = junk.clone();
                j[0] |= 0x80; // surely unknown flags
                let _ = c.send(&j);
                expect_closed(&mut c, "after garbage")
            }),
        ));
    }
    {
        let target = target.clone();
        let junk = rng.bytes(4096);
        cases.push((
            "garbage instead of an option",
            Box::new(move || {
                let mut c = raw(&target)?;
                ctx(c.start_fixed_newstyle(), "handshake")?;
                let _ = c.send(&junk);
                expect_closed(&mut c, "after garbage options")
            }),
        ));
    }
    {
        let target = target.clone();
        cases.push((
            "NBD_OPT_GO announcing 4 GiB of data",
            Box::new(move || {
                let mut c = raw(&target)?;
                ctx(c.start_fixed_newstyle(), "handshake")?;
                ctx(c.send_option_header(OPT_GO, 0xffff_fff0), "option header")?;
                let _ = c.send(&[0u8; 32]);
                expect_option_error_or_close(&mut c, "absurd option length")
            }),
        ));
    }
    {
        let target = target.clone();
        cases.push((
            "NBD_OPT_EXPORT_NAME announcing 4 GiB of name",
            Box::new(move || {
                let mut c = raw(&target)?;
                ctx(c.start_fixed_newstyle(), "handshake")?;
                ctx(c.send_option_header(OPT_EXPORT_NAME, 0xffff_ffff), "option header")?;
                let _ = c.send(b"abc");
                expect_closed(&mut c, "absurd export name length")
            }),
        ));
    }
    {
        let (target, token) = (target.clone(), token.clone());
        cases.push((
            "NBD_OPT_LIST gets a policy error and no name, then NBD_OPT_GO still works",
            Box::new(move || {
                let mut c = raw(&target)?;
                ctx(c.start_fixed_newstyle(), "handshake")?;
                ctx(c.send_option(OPT_LIST, &[]), "send LIST")?;
                let r = ctx(c.read_option_reply(), "LIST reply")?;
                if r.data.windows(token.len()).any(|w| w == token.as_bytes()) {
                    return Err("NBD_OPT_LIST revealed the attach token".into());
                }
                match r.reply_type {
                    REP_ERR_POLICY => {}
                    REP_SERVER => return Err("NBD_OPT_LIST answered with an export (NBD_REP_SERVER)".into()),
                    t => {
                        return Err(format!(
                            "NBD_OPT_LIST answered {t:#x} ({}), expected NBD_REP_ERR_POLICY",
                            nbd_client::option_reply_name(t)
                        ))
                    }
                }
                ctx(c.send_option(OPT_GO, &info_request(&token, &[])), "send GO")?;
                let (size, _, _) = ctx(read_info_replies(&mut c, OPT_GO), "GO after LIST")?;
                if size != SIZE {
                    return Err(format!("GO after LIST: size {size}"));
                }
                Ok(())
            }),
        ));
    }
    {
        let (target, token) = (target.clone(), token.clone());
        cases.push((
            "NBD_OPT_INFO and NBD_OPT_GO of unknown exports, unknown option, then NBD_OPT_ABORT",
            Box::new(move || {
                let mut c = raw(&target)?;
                ctx(c.start_fixed_newstyle(), "handshake")?;
                for (opt, name) in [(OPT_INFO, "no-such-export"), (OPT_GO, "no-such-export"), (OPT_GO, "")] {
                    ctx(c.send_option(opt, &info_request(name, &[INFO_BLOCK_SIZE])), "send option")?;
                    let r = ctx(c.read_option_reply(), &format!("reply to option {opt} for {name:?}"))?;
                    if !r.is_error() {
                        return Err(format!("option {opt} for unknown export {name:?} answered {:#x}", r.reply_type));
                    }
                    if r.data.windows(token.len()).any(|w| w == token.as_bytes()) {
                        return Err("an error message revealed the attach token".into());
                    }
                }
                // Inconsistent lengths: the name is said to be longer than the option.
                let mut bad = 1000u32.to_be_bytes().to_vec();
                bad.extend_from_slice(b"abc");
                ctx(c.send_option(OPT_INFO, &bad), "send bad INFO")?;
                let r = ctx(c.read_option_reply(), "reply to inconsistent INFO")?;
                if !r.is_error() {
                    return Err(format!("inconsistent NBD_OPT_INFO answered {:#x}", r.reply_type));
                }
                ctx(c.send_option(999, b"whatever"), "send unknown option")?;
                let r = ctx(c.read_option_reply(), "reply to unknown option")?;
                if r.reply_type != REP_ERR_UNSUP {
                    return Err(format!("unknown option answered {:#x}, expected NBD_REP_ERR_UNSUP", r.reply_type));
                }
                ctx(c.send_option(OPT_ABORT, &[]), "send ABORT")?;
                match c.read_option_reply() {
                    Ok(r) if r.reply_type == REP_ACK => {}
                    Ok(r) => return Err(format!("ABORT answered {:#x}", r.reply_type)),
                    Err(e) if e.is_closed() => {}
                    Err(e) => return Err(format!("ABORT: {e}")),
                }
                expect_closed(&mut c, "after ABORT")
            }),
        ));
    }
    {
        let target = target.clone();
        cases.push((
            "NBD_OPT_EXPORT_NAME of an unknown or empty name closes the connection",
            Box::new(move || {
                for name in ["no-such-export", ""] {
                    let mut c = raw(&target)?;
                    ctx(c.start_fixed_newstyle(), "handshake")?;
                    ctx(c.send_option(OPT_EXPORT_NAME, name.as_bytes()), "send EXPORT_NAME")?;
                    match c.wait_closed(REACT) {
                        Ending::Closed { bytes_before_close: 0 } => {}
                        other => return Err(format!("EXPORT_NAME {name:?}: {other:?}, expected a silent close")),
                    }
                }
                Ok(())
            }),
        ));
    }
    {
        let tcp = tcp.clone();
        cases.push((
            "NBD_OPT_EXPORT_NAME of the right name works",
            Box::new(move || {
                let mut c =
                    NbdClient::connect_with(&tcp, &ConnectOptions { structured_replies: false, use_export_name: true })
                        .map_err(|e| format!("connect with EXPORT_NAME: {e}"))?;
                if c.size() != SIZE {
                    return Err(format!("size {}", c.size()));
                }
                still_works(&mut c, "EXPORT_NAME client")
            }),
        ));
    }
    {
        let target = target.clone();
        cases.push((
            "structured reply option with data",
            Box::new(move || {
                let mut c = raw(&target)?;
                ctx(c.start_fixed_newstyle(), "handshake")?;
                ctx(c.send_option(OPT_STRUCTURED_REPLY, &[1, 2, 3, 4]), "send option")?;
                expect_option_error_or_close(&mut c, "STRUCTURED_REPLY with data")
            }),
        ));
    }
    {
        let tcp = tcp.clone();
        cases.push((
            "request with a bad magic closes the connection",
            Box::new(move || {
                let mut c = client(&tcp, true)?;
                ctx(c.send_request_raw(0xdead_beef, 0, CMD_READ, 1, 0, 4096, &[]), "send")?;
                expect_closed(&mut c.conn, "after a bad request magic")
            }),
        ));
    }
    for structured in [true, false] {
        let tcp = tcp.clone();
        cases.push((
            if structured { "READ past the end (structured)" } else { "READ past the end (simple)" },
            Box::new(move || {
                let mut c = client(&tcp, structured)?;
                for (off, len) in [(SIZE - 4095, 4096), (SIZE, 1), (SIZE + (1 << 40), 512), (u64::MAX - 100, 4096)] {
                    expect_errno(c.read(off, len).map(|_| ()), Some(EINVAL), &format!("READ {off}+{len}"))?;
                }
                still_works(&mut c, "after reads past the end")
            }),
        ));
    }
    for structured in [true, false] {
        let tcp = tcp.clone();
        cases.push((
            if structured { "WRITE past the end (structured)" } else { "WRITE past the end (simple)" },
            Box::new(move || {
                let mut c = client(&tcp, structured)?;
                match c.write(SIZE - 100, &[0xa5u8; 4096]) {
                    Ok(()) => return Err("WRITE past the end succeeded".into()),
                    Err(e) if matches!(e.errno(), Some(EINVAL) | Some(ENOSPC)) => {}
                    Err(e) => return Err(format!("WRITE past the end: {e} (expected EINVAL or ENOSPC)")),
                }
                let tail = ctx(c.read(SIZE - 100, 100), "read the last bytes")?;
                if tail.iter().any(|&b| b != 0) {
                    return Err("a refused WRITE past the end changed the last bytes".into());
                }
                for cmd in [CMD_TRIM, CMD_WRITE_ZEROES] {
                    expect_errno(
                        c.simple_command(cmd, 0, SIZE - 4096, 8192),
                        None,
                        &format!("command {cmd} past the end"),
                    )?;
                }
                still_works(&mut c, "after writes past the end")
            }),
        ));
    }
    for structured in [true, false] {
        let tcp = tcp.clone();
        cases.push((
            if structured { "unknown command (structured)" } else { "unknown command (simple)" },
            Box::new(move || {
                let mut c = client(&tcp, structured)?;
                expect_errno(c.simple_command(42, 0, 0, 0), Some(EINVAL), "command 42")?;
                expect_errno(c.simple_command(0x7fff, 0, 4096, 512), Some(EINVAL), "command 0x7fff")?;
                still_works(&mut c, "after unknown commands")
            }),
        ));
    }
    {
        let tcp = tcp.clone();
        cases.push((
            "READ of 32 MiB works, READ over 32 MiB is refused",
            Box::new(move || {
                let mut c = client(&tcp, true)?;
                let max = ctx(c.read(0, 32 << 20), "READ of exactly 32 MiB")?;
                if max.len() != 32 << 20 {
                    return Err("short 32 MiB read".into());
                }
                match c.read(0, (32 << 20) + 4096) {
                    Ok(_) => Err("READ of 32 MiB + 4 KiB succeeded (the advertised maximum is 32 MiB)".into()),
                    Err(e) if e.is_closed() => Ok(()),
                    Err(e) if e.errno().is_some() => still_works(&mut c, "after an oversized READ"),
                    Err(e) => Err(format!("oversized READ: {e}")),
                }
            }),
        ));
    }
    {
        let tcp = tcp.clone();
        cases.push((
            "WRITE over 32 MiB is refused",
            Box::new(move || {
                let mut c = client(&tcp, true)?;
                let len: u32 = (32 << 20) + 4096;
                let h = ctx(c.send_request(0, CMD_WRITE, 0, len, &[]), "send header")?;
                // The payload goes in the background: the server may close before taking it all.
                let mut w = c.conn.stream.try_clone().map_err(|e| e.to_string())?;
                let sender = thread::spawn(move || {
                    use std::io::Write;
                    let chunk = vec![0x77u8; 1 << 20];
                    let mut left = len as usize;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        if w.write_all(&chunk[..n]).is_err() {
                            break;
                        }
                        left -= n;
                    }
                });
                c.set_timeout(Duration::from_secs(30));
                let r = c.read_reply(h, CMD_WRITE, 0, len);
                let _ = c.conn.stream.shutdown(std::net::Shutdown::Both);
                let _ = sender.join();
                match r {
                    Ok(_) => Err("WRITE of 32 MiB + 4 KiB succeeded (the advertised maximum is 32 MiB)".into()),
                    Err(e) if e.is_closed() || e.errno().is_some() => Ok(()),
                    Err(e) => Err(format!("oversized WRITE: {e}")),
                }
            }),
        ));
    }
    {
        let (tcp, target) = (tcp.clone(), target.clone());
        let payload = rng.bytes(300 * 1024);
        cases.push((
            "clients vanishing mid-request",
            Box::new(move || {
                // Half a WRITE payload, then gone.
                let mut c = client(&tcp, true)?;
                ctx(c.send_request(0, CMD_WRITE, 8 * MIB, 1 << 20, &payload), "send half a write")?;
                drop(c);
                // Half a request header, then gone.
                let mut c = client(&tcp, false)?;
                ctx(c.conn.send(&REQUEST_MAGIC.to_be_bytes()), "send half a header")?;
                ctx(c.conn.send(&[0, 0, 0]), "send half a header")?;
                drop(c);
                // Half an option, then gone; and connections closed right away, many times.
                let mut c = raw(&target)?;
                ctx(c.start_fixed_newstyle(), "handshake")?;
                ctx(c.send_option_header(OPT_GO, 100), "option header")?;
                ctx(c.send(&[0, 0, 0, 5, b'a']), "half an option")?;
                drop(c);
                for _ in 0..50 {
                    drop(raw(&target)?);
                }
                Ok(())
            }),
        ));
    }
    {
        let tcp = tcp.clone();
        cases.push((
            "NBD_CMD_DISC closes without a reply",
            Box::new(move || {
                let c = client(&tcp, true)?;
                c.disconnect().map_err(|e| format!("DISC: {e}"))
            }),
        ));
    }

    for (i, (name, case)) in cases.iter_mut().enumerate() {
        let result = catch_unwind(AssertUnwindSafe(case)).unwrap_or_else(|p| {
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default())
        });
        if let Err(why) = result {
            failures.push(format!("{name}: {why}"));
        }
        if !d.is_running() {
            panic!("evs-target died during case {name:?}\nearlier failures: {failures:#?}\n{}", d.log());
        }
        // A fresh client still works after each case.
        let mut c = NbdClient::connect(if i % 2 == 0 { &tcp } else { &unix })
            .unwrap_or_else(|e| panic!("after case {name:?}: a new client cannot connect: {e}"));
        let data = Rng::new(i as u64).bytes(8192);
        let off = 24 * MIB + i as u64 * 8192;
        c.write(off, &data).unwrap_or_else(|e| panic!("after case {name:?}: write: {e}"));
        let got = c.read(off, 8192).unwrap_or_else(|e| panic!("after case {name:?}: read: {e}"));
        assert_bytes_eq(&got, &data, off, &format!("after case {name:?}"));
        c.disconnect().unwrap_or_else(|e| panic!("after case {name:?}: disconnect: {e}"));
    }

    stop.store(true, Ordering::Relaxed);
    let good_ops = good.join().expect("good client thread panicked");
    let mut idle_client = idle_client;
    idle_client.set_timeout(REACT);
    let idle_ok = still_works(&mut idle_client, "client idle during the whole test");
    d.assert_running();
    drop(idle);
    drop(idle_client);

    let mut report = failures.clone();
    match &good_ops {
        Ok(n) if *n > 0 => {}
        Ok(_) => report.push("the well-behaved client completed no operation".into()),
        Err(e) => report.push(e.clone()),
    }
    if let Err(e) = idle_ok {
        report.push(e);
    }
    assert!(report.is_empty(), "{} problems:\n{}", report.len(), report.join("\n"));

    let status = d.terminate();
    assert!(status.success(), "evs-target exited with {status} on SIGTERM after the bad inputs\n{}", d.log());
}
