//! qemu-io and qemu-img against an attached volume.

use std::process::Command;

use evs_tests::tools::{format_output, output_with_timeout, run_tool, stdout_text, DEFAULT_TOOL_TIMEOUT};
use evs_tests::util::{assert_bytes_eq, assert_files_equal, file_checksum, Rng, KIB, MIB};
use evs_tests::{require_tool, Daemon, NbdClient};

/// Runs `qemu-io -f raw TARGET -c CMD...`, which must exit 0 and print no sign of failure
/// (qemu-io reports a pattern mismatch on stdout, and older versions still exit 0).
fn qemu_io(target: &str, cmds: &[String]) -> String {
    let mut c = Command::new(require_tool("qemu-io"));
    c.arg("-f").arg("raw").arg(target);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = output_with_timeout(&mut c, DEFAULT_TOOL_TIMEOUT);
    let text = format!("{}\n{}", stdout_text(&out), String::from_utf8_lossy(&out.stderr));
    let lower = text.to_lowercase();
    if !out.status.success()
        || lower.contains("pattern verification failed")
        || lower.contains("failed")
        || lower.contains("error")
        || lower.contains("input/output")
    {
        panic!("qemu-io on {target} reported a failure\n{}", format_output(&out));
    }
    text
}

fn count_lines(text: &str, prefix: &str) -> usize {
    text.lines().filter(|l| l.starts_with(prefix)).count()
}

/// One write of the pattern test: `len` bytes of `pattern` at `off`.
#[derive(Clone, Copy, Debug)]
struct Case {
    off: u64,
    len: u64,
    pattern: u8,
}

/// Writes at many offsets and lengths, aligned and not (sector offsets, odd bytes, spans
/// crossing 4 KiB blocks, the last byte of the volume) with qemu-io over TCP, then reads each
/// back with `read -P` over the unix socket, checks the bytes around each range are still
/// zero, and checks all of it once more with the raw client.
#[test]
fn qemu_io_patterns_at_aligned_and_unaligned_offsets() {
    require_tool("qemu-io");
    let d = Daemon::start();
    let size = 64 * MIB;
    let (tcp, unix) = d.create_volume("qemu-io-patterns", "64M");

    // Each case lives in its own 256 KiB slot, so ranges never touch and the bytes before and
    // after each one must stay zero.
    let slot = 256 * KIB;
    let fixed: &[(u64, u64)] = &[
        (0, 4096),
        (0, 512),
        (512, 512),
        (1, 1),
        (4095, 2),
        (4096 - 7, 4096 + 14),
        (3, 65536),
        (3 * 4096 + 100, 3 * 4096),
        (0, 200 * KIB + 7),
        (511, 1),
        (8191, 8193),
        (1000, 100_000),
        (2048, 4096),
        (4096, 16 * 4096),
        (12345, 54321),
        (4096 * 7 + 4095, 4097),
        (100, 127 * KIB),
    ];
    let mut cases = Vec::new();
    let mut rng = Rng::from_env_or_time("qemu_io_patterns");
    let mut slot_no = 0u64;
    let pattern_of = |i: usize| ((i * 37) % 254 + 1) as u8;
    for &(o, l) in fixed {
        cases.push(Case { off: slot_no * slot + o, len: l, pattern: pattern_of(cases.len()) });
        slot_no += 1;
    }
    for _ in 0..40 {
        let o = rng.below(64 * KIB);
        let l = match rng.below(4) {
            0 => rng.range(1, 600),
            1 => 512 * rng.range(1, 64),
            2 => 4096 * rng.range(1, 32),
            _ => rng.range(1, 128 * KIB),
        };
        let o = if rng.chance(3) { o & !511 } else { o };
        cases.push(Case { off: slot_no * slot + o, len: l, pattern: pattern_of(cases.len()) });
        slot_no += 1;
    }
    // The very end of the volume, in the last slot (kept apart from the others).
    assert!(slot_no * slot < size - slot);
    cases.push(Case { off: size - 1, len: 1, pattern: pattern_of(cases.len()) });
    cases.push(Case { off: size - 4096 - 3000, len: 3000, pattern: pattern_of(cases.len()) });

    let writes: Vec<String> =
        cases.iter().map(|c| format!("write -P {:#04x} {} {}", c.pattern, c.off, c.len)).collect();
    let out = qemu_io(&tcp, &writes);
    assert_eq!(count_lines(&out, "wrote "), cases.len(), "qemu-io did not report every write:\n{out}");

    let mut reads = Vec::new();
    for c in &cases {
        reads.push(format!("read -P {:#04x} {} {}", c.pattern, c.off, c.len));
        if c.off > 0 {
            reads.push(format!("read -P 0 {} 1", c.off - 1));
        }
        if c.off + c.len < size {
            reads.push(format!("read -P 0 {} 1", c.off + c.len));
        }
    }
    // Never-written ranges read as zeros, unaligned too.
    reads.push(format!("read -P 0 {} {}", slot_no * slot + 1, 3 * slot - 3));
    let out = qemu_io(&unix, &reads);
    assert_eq!(count_lines(&out, "read "), reads.len(), "qemu-io did not report every read:\n{out}");

    // The same through the raw client, byte for byte.
    let mut c = NbdClient::connect(&tcp).unwrap_or_else(|e| panic!("connect {tcp}: {e}"));
    assert_eq!(c.size(), size);
    for case in &cases {
        let lo = case.off.saturating_sub(1);
        let hi = (case.off + case.len + 1).min(size);
        let got = c.read(lo, (hi - lo) as u32).unwrap_or_else(|e| panic!("read {case:?}: {e}"));
        let mut want = vec![0u8; (hi - lo) as usize];
        want[(case.off - lo) as usize..(case.off - lo + case.len) as usize].fill(case.pattern);
        assert_bytes_eq(&got, &want, lo, &format!("raw read of {case:?}"));
    }
    c.disconnect().expect("disconnect");
}

/// Random overlapping writes, zero-writes and discards (4 KiB aligned) applied by qemu-io both
/// to the volume and to a local raw file; `qemu-img compare` must call them identical, a full
/// read through the raw client must equal the local file, and a one-byte difference must be
/// seen by `qemu-img compare` (so the comparison really compares).
#[test]
fn qemu_img_compare_against_local_raw_file() {
    require_tool("qemu-io");
    require_tool("qemu-img");
    let d = Daemon::start();
    let size = 32 * MIB;
    let (tcp, unix) = d.create_volume("qemu-img-compare", "32M");
    let local = d.root().join("local.raw");
    run_tool(Command::new("qemu-img").args(["create", "-f", "raw"]).arg(&local).arg("32M"));

    let mut rng = Rng::from_env_or_time("qemu_img_compare");
    let mut ops = Vec::new();
    for _ in 0..150 {
        let off = rng.below(size - 1);
        let max = (size - off).min(300 * KIB);
        let len = rng.range(1, max + 1);
        match rng.below(10) {
            0 => ops.push(format!("write -z {off} {len}")),
            1 => {
                let off = off & !4095;
                let len = ((len + 4095) & !4095).min(size - off);
                ops.push(format!("discard {off} {len}"));
            }
            _ => {
                // 0xee is kept out: the negative check below relies on it.
                let mut p = rng.range(1, 255) as u8;
                if p == 0xee {
                    p = 0xed;
                }
                ops.push(format!("write -P {p:#04x} {off} {len}"));
            }
        }
    }
    // Half of the operations over TCP, half over the unix socket (two connections in turn).
    let (first, second) = ops.split_at(ops.len() / 2);
    qemu_io(&tcp, first);
    qemu_io(&unix, second);
    qemu_io(&local.to_string_lossy(), &ops);

    let out = run_tool(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&local).arg(&tcp));
    assert!(
        stdout_text(&out).contains("Images are identical"),
        "qemu-img compare did not say identical:\n{}",
        format_output(&out)
    );

    let mut c = NbdClient::connect(&unix).unwrap_or_else(|e| panic!("connect {unix}: {e}"));
    let got = c.read_all(0, size, 4 << 20).expect("read the whole volume");
    let want = std::fs::read(&local).unwrap();
    assert_bytes_eq(&got, &want, 0, "volume vs local raw file");
    c.disconnect().expect("disconnect");

    // A difference must be noticed.
    qemu_io(&local.to_string_lossy(), &["write -P 0xee 777777 1".to_string()]);
    let out = output_with_timeout(
        Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&local).arg(&tcp),
        DEFAULT_TOOL_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1), "qemu-img compare should report a mismatch\n{}", format_output(&out));
    // qemu-img reports the start of the first differing sector.
    let text = stdout_text(&out);
    let at: Option<u64> = text
        .split("Content mismatch at offset ")
        .nth(1)
        .and_then(|r| r.trim_start().split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok());
    assert!(
        at.is_some_and(|at| at <= 777_777 && 777_777 - at < 4096),
        "mismatch at 777777 not reported\n{}",
        format_output(&out)
    );
}

/// `qemu-img convert -n` of a few hundred MiB raw image (random data, zero-filled data, holes,
/// unaligned pieces) into the volume and back out: byte-identical; `qemu-img info` shows the
/// virtual size.
#[test]
fn qemu_img_convert_round_trip_and_info() {
    require_tool("qemu-img");
    let d = Daemon::start();
    let size = 320 * MIB;
    let (tcp, unix) = d.create_volume("qemu-img-convert", "320M");

    let info = run_tool(Command::new("qemu-img").args(["info", "--output=json"]).arg(&tcp));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("qemu-img info JSON");
    assert_eq!(v["virtual-size"].as_u64(), Some(size), "qemu-img info: {v}");

    // The source image: sparse, with random pieces (some unaligned), pieces of explicit zeros
    // and the last bytes of the image.
    let src = d.root().join("src.raw");
    let mut rng = Rng::from_env_or_time("qemu_img_convert");
    let mut pieces = Vec::new();
    for i in 0..48u64 {
        let slot = 6 * MIB;
        let off = i * slot + rng.below(2 * MIB);
        let len = match i % 4 {
            0 => 4 * MIB,
            1 => rng.range(1, 64 * KIB),
            2 => 4096 * rng.range(1, 256),
            _ => rng.range(MIB, 3 * MIB),
        };
        let data = if i % 7 == 3 { vec![0u8; len as usize] } else { rng.bytes(len as usize) };
        pieces.push((off, data));
    }
    pieces.push((size - 12345, rng.bytes(12345)));
    evs_tests::util::write_sparse_file(&src, size, &pieces);

    run_tool(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(&tcp));
    let out = run_tool(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&unix));
    assert!(stdout_text(&out).contains("Images are identical"), "{}", format_output(&out));

    let back = d.root().join("back.raw");
    run_tool(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&unix).arg(&back));
    assert_eq!(file_checksum(&src), file_checksum(&back), "checksums of the image and of its round trip differ");
    assert_files_equal(&src, &back);

    let info = run_tool(Command::new("qemu-img").args(["info", "--output=json"]).arg(&unix));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("qemu-img info JSON");
    assert_eq!(v["virtual-size"].as_u64(), Some(size), "qemu-img info over the unix socket: {v}");
}
