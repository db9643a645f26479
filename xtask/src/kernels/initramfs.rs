//! The guest's root file system: an uncompressed `newc` cpio archive (what the kernel unpacks
//! into its initial tmpfs) holding the guest agent as `/init`, the release `observer` as
//! `/bin/observer`, the host's shared libraries both need (at the paths `ldd` names), and
//! `/dev/console` (the kernel opens it for `/init`'s output before anything is mounted).

use std::{collections::BTreeSet, path::Path, process::Command};

use anyhow::{Context as _, bail};

/// Writes the archive for `agent` and `observer` to `out`.
pub fn build(agent: &Path, observer: &Path, out: &Path) -> anyhow::Result<()> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "run", "etc"] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.file("init", 0o755, &std::fs::read(agent)?);
    cpio.file("bin/observer", 0o755, &std::fs::read(observer)?);
    let mut libraries = BTreeSet::new();
    for binary in [agent, observer] {
        libraries.extend(shared_libraries(binary)?);
    }
    let mut dirs = BTreeSet::new();
    for library in &libraries {
        let relative = library.strip_prefix("/").unwrap_or(library);
        for parent in relative.ancestors().skip(1) {
            if !parent.as_os_str().is_empty() {
                dirs.insert(parent.to_path_buf());
            }
        }
    }
    // Parents before children (a BTreeSet of paths sorts `lib` before `lib/x86_64-linux-gnu`).
    for dir in dirs {
        cpio.dir(&dir.to_string_lossy());
    }
    for library in &libraries {
        let data =
            std::fs::read(library).with_context(|| format!("reading {}", library.display()))?;
        let relative = library.strip_prefix("/").unwrap_or(library);
        cpio.file(&relative.to_string_lossy(), 0o755, &data);
    }
    std::fs::write(out, cpio.finish()).with_context(|| format!("writing {}", out.display()))
}

/// The shared libraries `binary` loads, as `ldd` resolves them on this host (the dynamic
/// loader included).
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot run ldd")?;
    if !output.status.success() {
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&output.stdout)))
}

/// The absolute paths in `ldd`'s output: `libc.so.6 => /lib/.../libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has none.
fn parse_ldd(text: &str) -> Vec<std::path::PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = line.split_once("=> ").map_or(line, |(_, right)| right);
            let path = path.split(" (").next()?.trim();
            path.starts_with('/').then(|| path.into())
        })
        .collect()
}

/// A `newc` archive being written: 110-byte ASCII headers, names and data padded to 4 bytes.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, path: &str) {
        self.entry(path, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, path: &str, permissions: u32, data: &[u8]) {
        self.entry(path, 0o100_000 | permissions, (0, 0), data);
    }

    fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, 0o020_600, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.inode += 1;
        let fields = [
            self.inode,
            mode,
            0, // uid
            0, // gid
            if mode & 0o040_000 != 0 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0, // device major
            0, // device minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_absolute_paths_only() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f02)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f0277ade000)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                std::path::PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                "/lib64/ld-linux-x86-64.so.2".into()
            ]
        );
    }

    #[test]
    fn entries_are_newc_headers_padded_to_four_bytes() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"hello");
        let out = cpio.finish();
        assert_eq!(&out[..6], b"070701");
        // Mode of the first entry: a regular file, rwxr-xr-x.
        assert_eq!(&out[14..22], b"000081ed");
        // File size 5, name size 5 ("init" and its NUL).
        assert_eq!(&out[54..62], b"00000005");
        assert_eq!(&out[94..102], b"00000005");
        // Header (110) + name (5) padded to 116, then the data.
        assert_eq!(&out[116..121], b"hello");
        assert_eq!(out.len() % 4, 0);
        let trailer = out.windows(10).position(|w| w == b"TRAILER!!!");
        assert!(trailer.is_some());
    }
}
