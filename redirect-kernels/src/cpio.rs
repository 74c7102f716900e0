//! A newc cpio writer: the initramfs format.

use std::{collections::BTreeSet, fmt::Write as _};

use anyhow::Result;

/// Writes a newc ("070701") cpio archive, the format the kernel unpacks as initramfs.
pub struct Cpio<W: std::io::Write> {
    out: W,
    ino: u32,
    written: u64,
    seen: BTreeSet<String>,
}

impl<W: std::io::Write> Cpio<W> {
    pub fn new(out: W) -> Self {
        Cpio {
            out,
            ino: 1,
            written: 0,
            seen: BTreeSet::new(),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> Result<()> {
        let name = name.trim_start_matches('/');
        let name = if name.is_empty() { "." } else { name };
        let mut hdr = String::with_capacity(110);
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        hdr.push_str("070701");
        for v in fields {
            write!(hdr, "{v:08x}").unwrap();
        }
        self.put(hdr.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    /// A directory and its parents (each once).
    pub fn dir(&mut self, path: &str) -> Result<()> {
        let mut acc = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            acc.push('/');
            acc.push_str(part);
            if self.seen.insert(acc.clone()) {
                self.entry(&acc.clone(), 0o040755, (0, 0), &[])?;
            }
        }
        Ok(())
    }

    fn parent(&mut self, path: &str) -> Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        Ok(())
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.parent(path)?;
        if !self.seen.insert(path.to_string()) {
            return Ok(());
        }
        self.entry(path, 0o100000 | (mode & 0o7777), (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.parent(path)?;
        if !self.seen.insert(path.to_string()) {
            return Ok(());
        }
        self.entry(path, 0o120777, (0, 0), target.as_bytes())
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> Result<()> {
        self.parent(path)?;
        if !self.seen.insert(path.to_string()) {
            return Ok(());
        }
        self.entry(path, 0o020600, (major, minor), &[])
    }

    pub fn finish(mut self) -> Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        let n = (512 - (self.written % 512) as usize) % 512;
        self.put(&vec![0u8; n])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn cpio_newc_layout() {
        let mut c = Cpio::new(Vec::new());
        c.file("/a/b", 0o644, b"hello").unwrap();
        c.symlink("/lib", "usr/lib").unwrap();
        let out = c.finish().unwrap();
        assert_eq!(out.len() % 512, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("070701"));
        // dir "a", file "a/b", symlink, trailer.
        assert_eq!(text.matches("070701").count(), 4);
        assert!(text.contains("a/b\0"));
        assert!(text.contains("TRAILER!!!"));
        // Every header starts 4-aligned.
        for (i, _) in text.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
        // The cpio tool reads it back.
        if redirect_devtools::find_on_path("cpio").is_some() {
            let mut child = Command::new("cpio")
                .args(["-t", "--quiet"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(&out).unwrap();
            let mut listed = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut listed)
                .unwrap();
            child.wait().unwrap();
            assert_eq!(listed.lines().collect::<Vec<_>>(), ["a", "a/b", "lib"]);
        }
    }
}
