//! Transmission-phase request parsing and validation on arbitrary bytes.
//!
//! Input layout: 9 bytes of session parameters (u64 export size, one byte of flags), then a
//! stream of requests as a client would send them. Checks that nothing panics and that
//! whatever `validate_request` accepts really is inside the export and the length limit.

#![no_main]

use evs_target::nbd::handshake::MAX_REQUEST_LEN;
use evs_target::nbd::proto::{
    parse_request, transmission_flags, validate_request, Command, NegotiatedFlags, REQUEST_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((params, mut stream)) = data.split_first_chunk::<9>() else {
        return;
    };
    let size =
        u64::from_be_bytes([params[0], params[1], params[2], params[3], params[4], params[5], params[6], params[7]]);
    let read_only = params[8] & 1 != 0;
    let structured = params[8] & 2 != 0;
    let negotiated = NegotiatedFlags {
        transmission_flags: transmission_flags(read_only, structured),
        structured_replies: structured,
        block_status: structured && params[8] & 4 != 0,
    };

    // Like the server: parse a header, skip a write's payload, repeat; stop where the server
    // would close the connection (bad magic) or wait for more bytes.
    while let Ok(Some(req)) = parse_request(stream) {
        let verdict = validate_request(&req, size, MAX_REQUEST_LEN, read_only, &negotiated);
        if verdict.is_ok() && req.cmd != Command::Disc {
            let end = req.offset.checked_add(u64::from(req.len));
            assert!(end.is_some_and(|end| end <= size), "accepted out of bounds: {req:?}");
            // Only commands that move a payload are held to the maximum block size (CACHE,
            // TRIM and WRITE_ZEROES are served over larger ranges without buffering: see
            // validate_request).
            if matches!(req.cmd, Command::Read | Command::Write) {
                assert!(req.len <= MAX_REQUEST_LEN, "accepted oversized: {req:?}");
            }
            assert!(!(read_only && req.cmd.is_write()), "accepted write on read-only");
        }
        let consumed = REQUEST_LEN.saturating_add(req.payload_len() as usize);
        stream = stream.get(consumed..).unwrap_or(&[]);
    }
});
