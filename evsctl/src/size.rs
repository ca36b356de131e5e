//! Sizes as people type and read them.
//!
//! Units are binary, as block devices, qemu-img and the clouds' disk sizes use them:
//! `512M` = 512 MiB, `10G` = 10 GiB. A bare number is bytes.

/// Parses `4096`, `512K`, `512M`, `10G`, `1T`, `1P` (case-insensitive; `10GiB`, `10GB` and
/// `10g` mean the same) into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let bad = |why: &str| {
        Err(format!(
            "invalid size {s:?}: {why} (expected a whole number of bytes, or one with a K, M, G, T or P suffix, e.g. 512M, 10G)"
        ))
    };
    if num.is_empty() {
        return bad("no number");
    }
    let shift = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return bad("unknown unit"),
    };
    let Ok(n) = num.parse::<u64>() else {
        return bad("too large");
    };
    n.checked_mul(1u64 << shift).map_or_else(|| bad("too large"), Ok)
}

/// Bytes in binary units: `4 KiB`, `10 GiB`, `1.5 GiB`, `512 B`.
pub fn format_size(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut unit = 0;
    let mut scale = 1024u64;
    while unit + 1 < UNITS.len() && b >= scale * 1024 {
        scale *= 1024;
        unit += 1;
    }
    if b.is_multiple_of(scale) {
        format!("{} {}", b / scale, UNITS[unit])
    } else {
        format!("{:.1} {}", b as f64 / scale as f64, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size(" 512 "), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
    }

    #[test]
    fn suffixes() {
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("32T"), Ok(32 << 40));
        assert_eq!(parse_size("2P"), Ok(2 << 50));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10GB"), Ok(10 << 30));
        assert_eq!(parse_size("10 G"), Ok(10 << 30));
        assert_eq!(parse_size("64k"), Ok(65536));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "G", "-1", "1.5G", "10X", "ten", "1G1", "99999999999999999999", "20000P"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(512 << 20), "512 MiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(1 << 40), "1 TiB");
    }
}
