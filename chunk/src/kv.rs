//! Small self-checking `key=value` text files (the directory stamp and the
//! per-extent metadata), written atomically.
//!
//! Format: UTF-8 lines `key=value`; lines that are empty or start with `#`
//! are comments. The last line is `crc32c=XXXXXXXX`, the crc32c (hex) of every
//! byte before that line. Anything else (bad UTF-8, missing or wrong crc, a
//! line without `=`, a duplicate key) is a parse error, never a panic.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const CRC_KEY: &str = "crc32c=";

/// Render `pairs` (after a `# comment` line) with a trailing crc line.
pub(crate) fn render(comment: &str, pairs: &[(&str, String)]) -> String {
    let mut body = format!("# {comment}\n");
    for (k, v) in pairs {
        body.push_str(k);
        body.push('=');
        body.push_str(v);
        body.push('\n');
    }
    let crc = crc32c::crc32c(body.as_bytes());
    body.push_str(&format!("{CRC_KEY}{crc:08x}\n"));
    body
}

/// Parse and verify a file produced by [`render`].
pub(crate) fn parse(raw: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "not valid UTF-8".to_string())?;
    let at = text
        .rfind(CRC_KEY)
        .filter(|&i| i == 0 || text.as_bytes()[i - 1] == b'\n')
        .ok_or_else(|| "missing crc32c line".to_string())?;
    let (body, crc_line) = text.split_at(at);
    let hex = crc_line[CRC_KEY.len()..].trim_end_matches('\n');
    if hex.len() != 8 {
        return Err(format!("malformed crc32c line {crc_line:?}"));
    }
    let want = u32::from_str_radix(hex, 16).map_err(|_| format!("malformed crc32c {hex:?}"))?;
    let have = crc32c::crc32c(body.as_bytes());
    if want != have {
        return Err(format!(
            "crc32c mismatch (file says {want:08x}, content is {have:08x})"
        ));
    }
    let mut map = BTreeMap::new();
    for line in body.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line without '=': {line:?}"))?;
        if map.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("duplicate key {k:?}"));
        }
    }
    Ok(map)
}

/// Fetch a required string field.
pub(crate) fn get<'a>(map: &'a BTreeMap<String, String>, key: &str) -> Result<&'a str, String> {
    map.get(key)
        .map(String::as_str)
        .ok_or_else(|| format!("missing field {key:?}"))
}

/// Fetch a required decimal `u64` field.
pub(crate) fn get_u64(map: &BTreeMap<String, String>, key: &str) -> Result<u64, String> {
    let v = get(map, key)?;
    v.parse()
        .map_err(|_| format!("field {key:?} is not a number: {v:?}"))
}

/// Read at most `limit` bytes; a longer file is an `InvalidData` error (these
/// files are tiny, so a huge one is garbage, not something to load).
pub(crate) fn read_small(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)?.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {limit} bytes", path.display()),
        ));
    }
    Ok(buf)
}

/// The temp file name used by [`write_atomic`] for `path`.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replace `path` atomically: write a temp file, fsync it, rename it over
/// `path`, fsync the directory. A crash leaves either the old or the new
/// content (plus possibly a stray `.tmp` file).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// fsync a directory so that creates, renames and unlinks in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let text = render("hello", &[("a", "1".into()), ("b", "x y".into())]);
        let map = parse(text.as_bytes()).unwrap();
        assert_eq!(get(&map, "a").unwrap(), "1");
        assert_eq!(get_u64(&map, "a").unwrap(), 1);
        assert_eq!(get(&map, "b").unwrap(), "x y");
        assert!(get(&map, "c").is_err());
        assert!(get_u64(&map, "b").is_err());
    }

    #[test]
    fn rejects_damage() {
        let text = render("hello", &[("a", "1".into())]);
        // Every single-byte change is detected (or at least never panics).
        for i in 0..text.len() {
            let mut raw = text.clone().into_bytes();
            raw[i] ^= 0x01;
            assert!(parse(&raw).is_err(), "flip at {i} not detected");
        }
        // Truncation at every point.
        for i in 0..text.len() - 1 {
            assert!(parse(&text.as_bytes()[..i]).is_err(), "cut at {i}");
        }
        assert!(parse(&[0xff, 0xfe]).is_err());
        assert!(parse(b"").is_err());
        let dup = "a=1\na=2\n";
        let crc = crc32c::crc32c(dup.as_bytes());
        assert!(parse(format!("{dup}crc32c={crc:08x}\n").as_bytes()).is_err());
        let noeq = "abc\n";
        let crc = crc32c::crc32c(noeq.as_bytes());
        assert!(parse(format!("{noeq}crc32c={crc:08x}\n").as_bytes()).is_err());
    }
}
