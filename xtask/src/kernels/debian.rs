//! Debian's own kernel packages, fetched with apt into a cache of our own and unpacked without
//! installing: only `/boot/vmlinuz-*` is taken from each.
//!
//! apt runs with a private configuration (its own source list, lists and status), so the
//! host's apt setup is neither used nor touched; it verifies the archives' signatures with
//! Debian's keyring as usual. The suites: Debian 12 (bookworm: 6.1, and 6.12 from its updates)
//! and Debian 11 (bullseye: 5.10).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const SUITES: &[(&str, &str)] = &[
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian", "bookworm-updates"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
    ("http://deb.debian.org/debian", "bullseye"),
    ("http://deb.debian.org/debian-security", "bullseye-security"),
];
/// Package lists older than this are fetched again.
const LISTS_FRESH_FOR: Duration = Duration::from_secs(24 * 3600);

/// A kernel ready to boot.
pub struct Kernel {
    /// What the user asked for: a series (`6.1`) or a file.
    pub label: String,
    /// The Debian package it came from (`None` for a file given by path).
    pub package: Option<String>,
    pub vmlinuz: PathBuf,
}

/// The newest Debian kernel of `series` (`6.1`, `6.12`, `5.10`), downloaded into `cache` once.
pub fn kernel(series: &str, cache: &Path) -> anyhow::Result<Kernel> {
    if std::env::consts::ARCH != "x86_64" {
        bail!("Debian kernels are fetched for x86_64 hosts only; give a vmlinuz path instead");
    }
    let apt = Apt::new(&cache.join("apt"))?;
    let package = match newest(&apt.package_names()?, series) {
        Some(package) => package,
        None => {
            // A series that appeared since the lists were fetched: fetch them again once.
            apt.update()?;
            newest(&apt.package_names()?, series).with_context(|| {
                format!(
                    "no Debian kernel package of the series {series} (bookworm and bullseye have 5.10, 6.1 and 6.12)"
                )
            })?
        }
    };
    let unpacked = cache.join("unpacked").join(&package);
    if let Some(vmlinuz) = find_vmlinuz(&unpacked) {
        return Ok(Kernel {
            label: series.to_string(),
            package: Some(package),
            vmlinuz,
        });
    }
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    let deb = apt.download(&package, &debs)?;
    std::fs::create_dir_all(&unpacked)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(r#"dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --wildcards './boot/vmlinuz-*'"#)
        .args(["sh".as_ref(), deb.as_os_str(), unpacked.as_os_str()])
        .status()
        .context("cannot run dpkg-deb and tar")?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&unpacked);
        bail!("unpacking {} failed ({status})", deb.display());
    }
    // The package is no longer needed: the kernel image is what is kept.
    let _ = std::fs::remove_file(&deb);
    let vmlinuz =
        find_vmlinuz(&unpacked).with_context(|| format!("{package} holds no /boot/vmlinuz-*"))?;
    Ok(Kernel {
        label: series.to_string(),
        package: Some(package),
        vmlinuz,
    })
}

fn find_vmlinuz(unpacked: &Path) -> Option<PathBuf> {
    std::fs::read_dir(unpacked.join("boot"))
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
}

/// The newest generic (not `cloud`, not `rt`) unsigned amd64 kernel image of `series` among
/// `names`: `linux-image-6.1.0-57-amd64-unsigned`, `linux-image-6.12.118+deb12-amd64-unsigned`.
fn newest(names: &[String], series: &str) -> Option<String> {
    let (major, minor) = series.split_once('.')?;
    if [major, minor]
        .iter()
        .any(|n| n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    names
        .iter()
        .filter(|name| {
            let Some(rest) = name
                .strip_prefix("linux-image-")
                .and_then(|rest| rest.strip_suffix("-amd64-unsigned"))
            else {
                return false;
            };
            // `6.1` must not take `6.12.…`: the series ends where a non-digit follows.
            rest.strip_prefix(series)
                .is_some_and(|after| after.starts_with(['.', '-', '+']))
                && !rest.contains("cloud")
                && !rest.ends_with("-rt")
        })
        .max_by(|a, b| natural(a).cmp(&natural(b)))
        .cloned()
}

/// A name as runs of digits (compared as numbers) and of other characters.
fn natural(name: &str) -> Vec<(u64, String)> {
    let mut parts = Vec::new();
    let mut rest = name;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 {
            parts.push((rest[..digits].parse().unwrap_or(u64::MAX), String::new()));
            rest = &rest[digits..];
        } else {
            let text = rest.len() - rest.trim_start_matches(|c: char| !c.is_ascii_digit()).len();
            parts.push((0, rest[..text].to_string()));
            rest = &rest[text..];
        }
    }
    parts
}

/// apt with a configuration of its own under `dir`.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(dir: &Path) -> anyhow::Result<Apt> {
        if !Path::new(KEYRING).is_file() {
            bail!("{KEYRING} is missing: install debian-archive-keyring");
        }
        for sub in ["lists/partial", "cache/archives/partial", "parts"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let sources: String = SUITES
            .iter()
            .map(|(uri, suite)| format!("deb [signed-by={KEYRING}] {uri} {suite} main\n"))
            .collect();
        std::fs::write(dir.join("sources.list"), sources)?;
        std::fs::write(dir.join("status"), "")?;
        let apt = Apt {
            dir: dir.to_path_buf(),
        };
        let fresh = std::fs::metadata(dir.join("updated"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < LISTS_FRESH_FOR);
        if !fresh {
            apt.update()?;
        }
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let dir = &self.dir;
        let mut command = Command::new(program);
        for (key, value) in [
            ("Dir::Etc::SourceList", dir.join("sources.list")),
            ("Dir::Etc::SourceParts", dir.join("parts")),
            ("Dir::Etc::PreferencesParts", dir.join("parts")),
            ("Dir::Etc::Preferences", dir.join("parts/none")),
            ("Dir::State::Lists", dir.join("lists")),
            ("Dir::State::status", dir.join("status")),
            ("Dir::Cache", dir.join("cache")),
        ] {
            command.arg("-o").arg(format!("{key}={}", value.display()));
        }
        command.args([
            "-o",
            "APT::Sandbox::User=root",
            "-o",
            "Acquire::Languages=none",
        ]);
        command
    }

    /// Runs `program args` (in `dir`, if given) with this configuration; its output, or an
    /// error with what it printed.
    fn run(&self, program: &str, args: &[&str], dir: Option<&Path>) -> anyhow::Result<String> {
        let mut command = self.command(program);
        command.args(args);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let output = command
            .output()
            .with_context(|| format!("cannot run {program}"))?;
        if !output.status.success() {
            bail!(
                "{program} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn update(&self) -> anyhow::Result<()> {
        self.run("apt-get", &["-qq", "update"], None)
            .context("fetching Debian's package lists for the kernels")?;
        std::fs::write(self.dir.join("updated"), "")?;
        Ok(())
    }

    fn package_names(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .run("apt-cache", &["pkgnames", "linux-image-"], None)?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Downloads `package`'s `.deb` into `into`; its path.
    fn download(&self, package: &str, into: &Path) -> anyhow::Result<PathBuf> {
        self.run("apt-get", &["-qq", "download", package], Some(into))?;
        std::fs::read_dir(into)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| {
                path.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with(&format!("{package}_")) && n.ends_with(".deb")
                })
            })
            .with_context(|| format!("apt-get download {package} left no .deb"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_generic_kernel_of_a_series_is_chosen() {
        let names: Vec<String> = [
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-57-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "linux-image-6.1.0-57-rt-amd64-unsigned",
            "linux-image-6.1.0-57-amd64",
            "linux-image-6.12.9+deb12-amd64-unsigned",
            "linux-image-6.12.118+deb12-amd64-unsigned",
            "linux-image-6.12.118+deb12-cloud-amd64-unsigned",
            "linux-image-5.10.0-46-amd64-unsigned",
            "linux-image-amd64",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            newest(&names, "6.1").as_deref(),
            Some("linux-image-6.1.0-57-amd64-unsigned")
        );
        assert_eq!(
            newest(&names, "6.12").as_deref(),
            Some("linux-image-6.12.118+deb12-amd64-unsigned")
        );
        assert_eq!(
            newest(&names, "5.10").as_deref(),
            Some("linux-image-5.10.0-46-amd64-unsigned")
        );
        assert_eq!(newest(&names, "6.6"), None);
        assert_eq!(newest(&names, "6"), None);
    }
}
