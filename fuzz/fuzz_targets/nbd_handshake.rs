//! The fixed-newstyle handshake with arbitrary bytes as the client side of the connection.
//!
//! Checks that the handshake never panics, always terminates (the input is finite and every
//! option consumes input or ends the handshake), and that a session it enters is coherent.

#![no_main]

use std::io::{self, Cursor, Read, Write};

use evs_target::nbd::handshake::{handshake, ExportInfo};
use evs_target::nbd::proto::{transmission_flags, MetaContext};
use libfuzzer_sys::fuzz_target;

/// Client bytes in, server bytes discarded.
struct Stream<'a> {
    input: Cursor<&'a [u8]>,
}

impl Read for Stream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Stream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn lookup(name: &str) -> Option<(u8, ExportInfo)> {
    match name {
        "vol" => Some((1, ExportInfo { size: 1 << 30, read_only: false, contexts: MetaContext::all() })),
        "ro" => Some((
            2,
            ExportInfo {
                size: 4096,
                read_only: true,
                contexts: vec![MetaContext::BaseAllocation, MetaContext::Changed("base".into())],
            },
        )),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut stream = Stream { input: Cursor::new(data) };
    if let Ok(Some(n)) = handshake(&mut stream, lookup) {
        let (export, info) = lookup(&n.name).expect("entered transmission on an unknown export");
        assert_eq!(n.export, export);
        assert_eq!((n.size, n.read_only), (info.size, info.read_only));
        assert_eq!(n.transmission_flags, transmission_flags(n.read_only, n.structured_replies));
        assert!(n.meta_contexts.is_empty() || n.structured_replies);
        for (_, ctx) in &n.meta_contexts {
            assert!(info.contexts.contains(ctx), "selected {ctx:?}, which the export does not offer");
        }
    }
});
