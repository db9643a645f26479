//! The figures as markdown, and `docs/BENCHMARKS.md`: each benchmark writes its own `## `
//! section, replacing it in place (or appending it) without touching the rest of the file.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use testkit::nginx::NGINX;

/// Prose lines are wrapped like the rest of the file.
const WIDTH: usize = 96;

/// Where a benchmark writes its section: `docs/BENCHMARKS.md` unless told otherwise. Every
/// benchmark's options flatten these in.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DocArgs {
    /// Print the figures without rewriting docs/BENCHMARKS.md.
    // Given twice (`cargo xtask bench --no-doc NAME -- --no-doc`) is still a yes.
    #[arg(long, overrides_with = "no_doc")]
    pub no_doc: bool,
    /// Write the section into this file instead of docs/BENCHMARKS.md.
    #[arg(long, value_name = "PATH", overrides_with = "doc")]
    pub doc: Option<PathBuf>,
}

impl DocArgs {
    /// The file to write, `None` with `--no-doc`.
    pub fn target(&self, workspace: &Path) -> Option<PathBuf> {
        if self.no_doc {
            return None;
        }
        Some(
            self.doc
                .clone()
                .unwrap_or_else(|| workspace.join("docs/BENCHMARKS.md")),
        )
    }

    /// Prints the section and, unless `--no-doc`, replaces it in the document.
    pub fn publish(&self, workspace: &Path, section: &str) -> anyhow::Result<()> {
        println!("\n{section}");
        if let Some(doc) = self.target(workspace) {
            replace_section(&doc, section)?;
            println!(
                "wrote the section \"{}\" of {}",
                section.lines().next().unwrap_or_default(),
                doc.display()
            );
        }
        Ok(())
    }

    /// The same choice as flags to pass on to a benchmark's own options.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.no_doc {
            args.push("--no-doc".to_owned());
        }
        if let Some(doc) = &self.doc {
            args.push("--doc".to_owned());
            args.push(doc.display().to_string());
        }
        args
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// A latency given in microseconds: `421 µs`, `12.5 ms`, `1.20 s`.
pub fn latency(us: f64) -> String {
    if us < 1e3 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// Thousands separated by commas.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A paragraph broken into lines of at most [`WIDTH`] characters, ending with a blank line.
pub fn paragraph(text: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > WIDTH {
            out += &line;
            out.push('\n');
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line += word;
    }
    out + &line + "\n\n"
}

/// A finished section: no trailing blank lines, one final newline.
pub fn finish(mut section: String) -> String {
    section.truncate(section.trim_end().len());
    section.push('\n');
    section
}

/// What a program prints (stdout and stderr), trimmed; empty if it cannot run.
fn output_of(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text).trim().to_owned()
        })
        .unwrap_or_default()
}

/// The machine and tools, and today's date, in one sentence.
pub fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            Some(
                l.strip_prefix("model name")?
                    .split_once(':')?
                    .1
                    .trim()
                    .to_owned(),
            )
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .map_or_else(String::new, |kib| {
            format!("{:.0} GiB, ", kib as f64 / 1024.0 / 1024.0)
        });
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let wrk = output_of("wrk", &["-v"]);
    let wrk = wrk.lines().next().unwrap_or_default();
    let wrk = wrk.split(" [").next().unwrap_or_default();
    let rustc = output_of("rustc", &["--version"]);
    let rustc = rustc.split(" (").next().unwrap_or_default();
    let date = output_of("date", &["-u", "+%F"]);
    format!(
        "Machine: `nproc` {cores}, {cpu}, {memory}kernel {}; {wrk}, {}, {rustc}. Date: {date}.",
        kernel.trim(),
        output_of(NGINX, &["-v"]).trim_start_matches("nginx version: "),
    )
}

/// Replaces the section whose heading is `section`'s first line (`## ...`), from that heading
/// to the next `## ` heading, or appends it at the end.
pub fn replace_section(doc: &Path, section: &str) -> anyhow::Result<()> {
    let text = fs::read_to_string(doc).with_context(|| format!("reading {}", doc.display()))?;
    fs::write(doc, replaced(&text, section)).with_context(|| format!("writing {}", doc.display()))
}

fn replaced(text: &str, section: &str) -> String {
    let title = section.lines().next().unwrap_or_default();
    debug_assert!(
        title.starts_with("## "),
        "a section starts with its heading"
    );
    let heading = format!("\n{title}\n");
    match text.find(&heading) {
        Some(start) => {
            let body = start + heading.len();
            let end = text[body..]
                .find("\n## ")
                .map_or(text.len(), |e| body + e + 1);
            let rest = &text[end..];
            format!(
                "{}\n{section}{}{rest}",
                &text[..start],
                if rest.is_empty() { "" } else { "\n" }
            )
        }
        None => format!("{}\n\n{section}", text.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_its_own_section() {
        let s = "## S\n\none\n";
        assert_eq!(
            replaced("# T\n\n## A\n\na\n", s),
            "# T\n\n## A\n\na\n\n## S\n\none\n"
        );
        assert_eq!(
            replaced("# T\n\n## S\n\nold\n\n## Z\n\nz\n", "## S\n\nnew\n"),
            "# T\n\n## S\n\nnew\n\n## Z\n\nz\n"
        );
        // A heading that merely starts the same is another section.
        assert_eq!(
            replaced("# T\n\n## S more\n\nx\n\n## S\n\nold\n", "## S\n\nnew\n"),
            "# T\n\n## S more\n\nx\n\n## S\n\nnew\n"
        );
    }

    #[test]
    fn writes_the_file() {
        let dir = std::env::temp_dir().join(format!("xtask-report-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let doc = dir.join("B.md");
        fs::write(&doc, "# T\n\n## S\n\nold\n").unwrap();
        let args = DocArgs {
            no_doc: false,
            doc: Some(doc.clone()),
        };
        args.publish(Path::new("/nonexistent"), "## S\n\nnew\n")
            .unwrap();
        assert_eq!(fs::read_to_string(&doc).unwrap(), "# T\n\n## S\n\nnew\n");
        assert_eq!(
            args.to_args(),
            ["--doc".to_owned(), doc.display().to_string()]
        );
        let none = DocArgs {
            no_doc: true,
            doc: None,
        };
        assert_eq!(none.target(Path::new("/w")), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn doc_flags_may_come_twice() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            doc: DocArgs,
        }
        use clap::Parser as _;
        let cli = Cli::try_parse_from(["x", "--no-doc", "--doc", "/a", "--no-doc", "--doc", "/b"])
            .unwrap();
        assert!(cli.doc.no_doc);
        assert_eq!(cli.doc.doc, Some(PathBuf::from("/b")));
    }

    #[test]
    fn wraps_and_groups() {
        assert_eq!(grouped(1234567), "1,234,567");
        assert_eq!(grouped(999), "999");
        assert_eq!(latency(421.4), "421 µs");
        assert_eq!(latency(268927.0), "268.9 ms");
        assert_eq!(latency(1.2e6), "1.20 s");
        let p = paragraph(&"word ".repeat(40));
        assert!(p.lines().all(|l| l.chars().count() <= WIDTH));
        assert!(p.ends_with("word\n\n"));
    }
}
