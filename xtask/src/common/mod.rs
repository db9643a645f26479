//! What the benchmarks share: the nginx pair they run (`nginx`, with testkit's launcher), the
//! closed-loop load (`wrk`), `/proc` readings and quiet-machine waits (`machine`), and the
//! markdown of `docs/BENCHMARKS.md` (`report`, `stats`). Ports, HTTP and the daemon's
//! processes come from `testkit`.

pub mod machine;
pub mod nginx;
pub mod report;
pub mod rounds;
pub mod stats;
pub mod wrk;

/// A benchmark's options from the arguments after `cargo xtask bench NAME --`; `name` is what
/// `--help` and errors call it.
pub fn parse_options<T: clap::Parser>(name: &str, args: &[String]) -> anyhow::Result<T> {
    Ok(T::try_parse_from(
        std::iter::once(name).chain(args.iter().map(String::as_str)),
    )?)
}

/// The request every benchmark client sends through nginx: what an Ollama client asks most,
/// with a small answer.
pub const PATH: &str = "/api/tags";
