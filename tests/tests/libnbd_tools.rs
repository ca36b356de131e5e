//! libnbd's tools (Debian package libnbd-bin) against attached volumes: nbdinfo (size, flags,
//! allocation map, export listing) and nbdcopy (multi-GiB round trip over several connections).

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::process::Command;

use serde_json::Value;

use evs_tests::tools::{format_output, output_with_timeout, run_tool, DEFAULT_TOOL_TIMEOUT};
use evs_tests::util::{assert_files_equal, file_checksum, Rng, BLOCK, GIB, KIB, MIB};
use evs_tests::{require_tool, u64_field, Daemon, NbdClient, NbdUri};

fn nbdinfo_json(args: &[&str]) -> Value {
    let out = run_tool(Command::new(require_tool("nbdinfo")).args(args));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo {} printed no JSON: {e}\n{}", args.join(" "), format_output(&out)))
}

/// The one export of `nbdinfo --json URI`.
fn nbdinfo_export(uri: &str) -> Value {
    let v = nbdinfo_json(&["--json", uri]);
    let exports = v["exports"].as_array().unwrap_or_else(|| panic!("nbdinfo --json: no exports array: {v}"));
    assert_eq!(exports.len(), 1, "nbdinfo --json {uri}: {v}");
    exports[0].clone()
}

/// Allocation state of every 4 KiB block from `nbdinfo --map --json` (true = allocated, i.e.
/// the extent's type has no NBD_STATE_HOLE bit).
fn allocation_map(uri: &str, size: u64) -> Vec<bool> {
    let v = nbdinfo_json(&["--map", "--json", uri]);
    let extents = v.as_array().unwrap_or_else(|| panic!("nbdinfo --map --json: not an array: {v}"));
    let mut map = vec![None::<bool>; (size / BLOCK) as usize];
    let mut pos = 0u64;
    for e in extents {
        let off = u64_field(e, "offset");
        let len = u64_field(e, "length");
        let ty = u64_field(e, "type");
        assert_eq!(off, pos, "nbdinfo --map: extents not contiguous at {pos}: {e}");
        assert!(len > 0, "empty extent {e}");
        // Our block store tracks 4 KiB blocks: extents must fall on block boundaries.
        assert!(
            off & (BLOCK - 1) == 0 && (len & (BLOCK - 1) == 0 || off + len == size),
            "extent not on 4 KiB boundaries: {e}"
        );
        for b in off / BLOCK..(off + len).div_ceil(BLOCK) {
            map[b as usize] = Some(ty & 1 == 0);
        }
        pos = off + len;
    }
    assert_eq!(pos, size, "nbdinfo --map covers [0, {pos}) of {size} bytes");
    map.into_iter().map(|b| b.unwrap()).collect()
}

/// Ranges (in bytes) where two block maps differ, for the failure message.
fn map_differences(got: &[bool], want: &[bool]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < got.len() {
        if got[i] != want[i] {
            let start = i;
            while i < got.len() && got[i] != want[i] {
                i += 1;
            }
            out.push(format!(
                "[{}, {}) reported {} but should be {}",
                start as u64 * BLOCK,
                i as u64 * BLOCK,
                if got[start] { "data" } else { "hole" },
                if want[start] { "data" } else { "hole" }
            ));
            if out.len() > 20 {
                break;
            }
        } else {
            i += 1;
        }
    }
    out.join("\n")
}

fn mark(map: &mut [bool], off: u64, len: u64, allocated: bool) {
    for b in off / BLOCK..(off + len).div_ceil(BLOCK) {
        map[b as usize] = allocated;
    }
}

fn allocated_bytes(d: &Daemon, name: &str) -> u64 {
    u64_field(&d.show_volume(name), "allocated_bytes")
}

/// nbdinfo reports the size, the flags and block sizes we promise; `--map` shows data exactly
/// where blocks were written (4 KiB granularity, unaligned writes allocate the blocks they
/// touch) and holes where nothing was written or whole blocks were trimmed; the volume's
/// allocated_bytes grows with writes and shrinks with trims.
#[test]
fn nbdinfo_shows_size_flags_and_allocation_map() {
    require_tool("nbdinfo");
    let d = Daemon::start();
    let size = 64 * MIB;
    let (tcp, unix) = d.create_volume("nbdinfo-map", "64M");

    for uri in [&tcp, &unix] {
        let e = nbdinfo_export(uri);
        assert_eq!(e["export-size"].as_u64(), Some(size), "nbdinfo --json {uri}: {e}");
        for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache"] {
            assert_eq!(e[flag].as_bool(), Some(true), "nbdinfo --json {uri}: {flag}: {e}");
        }
        assert_eq!(e["is_read_only"].as_bool(), Some(false), "{e}");
        assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{e}");
        assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{e}");
        assert_eq!(e["block_size_maximum"].as_u64(), Some(32 * MIB), "{e}");
        let contexts = e["contexts"].as_array().cloned().unwrap_or_default();
        assert!(contexts.iter().any(|c| c == "base:allocation"), "no base:allocation context: {e}");
    }

    // A fresh volume is all hole.
    let mut want = vec![false; (size / BLOCK) as usize];
    let got = allocation_map(&tcp, size);
    assert!(got == want, "fresh volume not all hole:\n{}", map_differences(&got, &want));
    assert_eq!(allocated_bytes(&d, "nbdinfo-map"), 0, "fresh volume has allocated bytes");

    let mut c = NbdClient::connect(&tcp).expect("connect");
    let mut rng = Rng::new(7);
    let writes: &[(u64, u64)] = &[
        (0, 64 * KIB),
        (MIB + 4 * KIB, 8 * KIB),
        (5 * MIB, MIB),
        (10 * MIB + 100, 10),    // inside one block
        (20 * MIB - 1, 2),       // straddles two blocks
        (30 * MIB + 4000, 5000), // touches three blocks
        (40 * MIB, 4 * MIB),     // several requests' worth
        (size - MIB, MIB),       // the end
    ];
    for &(off, len) in writes {
        c.write(off, &rng.bytes(len as usize)).unwrap_or_else(|e| panic!("write {off}+{len}: {e}"));
        mark(&mut want, off, len, true);
    }
    c.flush().expect("flush");
    let got = allocation_map(&unix, size);
    assert!(got == want, "map after writes differs:\n{}", map_differences(&got, &want));
    let blocks_after_writes = want.iter().filter(|&&b| b).count() as u64;
    let alloc1 = allocated_bytes(&d, "nbdinfo-map");
    assert!(
        alloc1 >= blocks_after_writes * BLOCK && alloc1 <= blocks_after_writes * BLOCK + 4 * MIB,
        "allocated_bytes {alloc1} after writing {blocks_after_writes} blocks (thin volume expected)"
    );

    let trims: &[(u64, u64)] = &[
        (5 * MIB + 256 * KIB, 256 * KIB),
        (0, 16 * KIB),
        (size - MIB / 2, MIB / 2),
        (40 * MIB, 4 * MIB), // a whole written range
        (50 * MIB, MIB),     // never written
    ];
    let mut freed = 0u64;
    for &(off, len) in trims {
        c.trim(off, len as u32).unwrap_or_else(|e| panic!("trim {off}+{len}: {e}"));
        for b in off / BLOCK..(off + len) / BLOCK {
            if want[b as usize] {
                freed += 1;
            }
        }
        mark(&mut want, off, len, false);
    }
    c.flush().expect("flush");
    let got = allocation_map(&tcp, size);
    assert!(got == want, "map after trims differs:\n{}", map_differences(&got, &want));

    // Trimmed blocks read as zeros, neighbours keep their data.
    let z = c.read(5 * MIB + 256 * KIB, (256 * KIB) as u32).expect("read trimmed range");
    assert!(z.iter().all(|&b| b == 0), "trimmed range does not read as zeros");
    let alloc2 = allocated_bytes(&d, "nbdinfo-map");
    assert!(
        alloc1 >= alloc2 + freed * BLOCK,
        "allocated_bytes went from {alloc1} to {alloc2} after trimming {freed} allocated blocks"
    );
    let blocks_after_trims = want.iter().filter(|&&b| b).count() as u64;
    assert!(alloc2 >= blocks_after_trims * BLOCK, "allocated_bytes {alloc2} < {blocks_after_trims} blocks");
    c.disconnect().expect("disconnect");
}

/// nbdcopy with 4 connections copies a 2 GiB image (mostly sparse, a few hundred MiB of random
/// data, some unaligned pieces) into a volume and back out; the checksums are equal.
#[test]
fn nbdcopy_round_trip_of_a_multi_gib_image() {
    require_tool("nbdcopy");
    require_tool("nbdinfo");
    let d = Daemon::start();
    let size = 2 * GIB;
    let (tcp, unix) = d.create_volume("nbdcopy-big", "2G");

    let src = d.root().join("src.raw");
    let mut rng = Rng::from_env_or_time("nbdcopy_round_trip");
    {
        let mut f = File::create(&src).unwrap();
        f.set_len(size).unwrap();
        // 80 pieces of 4 MiB of random data in distinct 4 MiB slots...
        let slots = size / (4 * MIB);
        let mut chosen = std::collections::BTreeSet::new();
        while chosen.len() < 80 {
            chosen.insert(rng.below(slots));
        }
        let mut buf = vec![0u8; (4 * MIB) as usize];
        for s in &chosen {
            rng.fill(&mut buf);
            f.seek(SeekFrom::Start(s * 4 * MIB)).unwrap();
            f.write_all(&buf).unwrap();
        }
        // ...a contiguous 64 MiB run, and small unaligned pieces anywhere.
        for i in 0..16 {
            rng.fill(&mut buf);
            f.seek(SeekFrom::Start(GIB + i * 4 * MIB)).unwrap();
            f.write_all(&buf).unwrap();
        }
        for _ in 0..64 {
            let len = rng.range(1, 70_000) as usize;
            let off = rng.below(size - len as u64);
            rng.fill(&mut buf[..len]);
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&buf[..len]).unwrap();
        }
        f.seek(SeekFrom::Start(size - 4096)).unwrap();
        f.write_all(&buf[..4096]).unwrap();
    }

    run_tool(Command::new("nbdcopy").arg("--connections=4").arg(&src).arg(&tcp));
    let back = d.root().join("back.raw");
    run_tool(Command::new("nbdcopy").arg("--connections=4").arg(&unix).arg(&back));
    let (a, b) = (file_checksum(&src), file_checksum(&back));
    if a != b {
        // Names the first differing byte.
        assert_files_equal(&src, &back);
    }
    assert_eq!(a, b, "checksums of the image and of its round trip differ");

    let e = nbdinfo_export(&tcp);
    assert_eq!(e["export-size"].as_u64(), Some(size), "{e}");
}

/// `nbdinfo --list` never shows an export name (the attach token) to a client that did not
/// present it.
#[test]
fn nbdinfo_list_does_not_reveal_export_names() {
    require_tool("nbdinfo");
    let d = Daemon::start();
    let (tcp1, unix1) = d.create_volume("list-one", "16M");
    let (tcp2, _unix2) = d.create_volume("list-two", "16M");
    let t1 = NbdUri::parse(&tcp1).unwrap().export;
    let t2 = NbdUri::parse(&tcp2).unwrap().export;
    assert!(!t1.is_empty() && !t2.is_empty());

    let bare_tcp = format!("nbd://{}/", d.nbd_addr);
    let bare_unix = format!("nbd+unix:///?socket={}", d.nbd_socket.display());
    let runs: Vec<(Vec<String>, Vec<&str>)> = vec![
        (vec!["--list".into(), bare_tcp.clone()], vec![&t1, &t2]),
        (vec!["--list".into(), "--json".into(), bare_tcp], vec![&t1, &t2]),
        (vec!["--list".into(), bare_unix], vec![&t1, &t2]),
        // Knowing one token must not reveal another.
        (vec!["--list".into(), tcp1.clone()], vec![&t2]),
        (vec!["--list".into(), unix1.clone()], vec![&t2]),
    ];
    for (args, secrets) in runs {
        let out = output_with_timeout(Command::new("nbdinfo").args(&args), DEFAULT_TOOL_TIMEOUT);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        for s in secrets {
            assert!(!text.contains(s), "nbdinfo {} revealed an attach token\n{}", args.join(" "), format_output(&out));
        }
    }
    // The volumes stay reachable by their own token.
    for uri in [&tcp1, &tcp2] {
        let c = NbdClient::connect(uri).unwrap_or_else(|e| panic!("connect {uri}: {e}"));
        assert_eq!(c.size(), 16 * MIB);
    }
}
