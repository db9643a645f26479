//! How `observer run`, `probe` and `proxy` pick the upstream to probe, from flags and the file.

use std::{ffi::OsString, path::Path};

use clap::{CommandFactory as _, FromArgMatches as _};

use crate::cli::{Cli, Command};
use crate::config_file::{self, ConfigFile};

const FILE: &str = "/etc/observer/observer.toml";

/// `observer ARGS`, completed by a config file holding `file` when given. The environment
/// is the test's own: `OBSERVER_UPSTREAM` is tried by the black-box test in `tests/cli.rs`,
/// as setting a variable here would race with every other test reading them.
fn parse(args: &[&str], file: Option<&str>) -> Command {
    let mut argv: Vec<OsString> = std::iter::once("observer")
        .chain(args.iter().copied())
        .map(OsString::from)
        .collect();
    if file.is_some() {
        argv.extend([OsString::from("--config"), OsString::from(FILE)]);
    }
    let matches = config_file::get_matches(Cli::command(), argv, |path| {
        assert_eq!(path, Path::new(FILE));
        Ok(ConfigFile::new(path, file.unwrap_or_default()))
    })
    .unwrap_or_else(|err| panic!("{args:?} does not parse: {err:?}"));
    Cli::from_arg_matches(&matches)
        .expect("matches make a Cli")
        .command
}

/// What `observer run ARGS` probes.
fn run_probes(args: &[&str], file: Option<&str>) -> String {
    let mut argv = vec!["run"];
    argv.extend_from_slice(args);
    match parse(&argv, file) {
        Command::Run(run) => run.probe_args().probe.upstream().to_string(),
        other => panic!("not run: {other:?}"),
    }
}

#[test]
fn run_probes_the_first_watched_upstream_on_loopback_by_default() {
    assert_eq!(
        run_probes(&["--watch", "11500=upstream"], None),
        "127.0.0.1:11500"
    );
    assert_eq!(
        run_probes(
            &[
                "--watch",
                "18789=gateway",
                "--watch",
                "11600=upstream",
                "--watch",
                "11500=upstream"
            ],
            None
        ),
        "127.0.0.1:11600"
    );
    // The default watch list has Ollama's port as the upstream.
    assert_eq!(run_probes(&[], None), "127.0.0.1:11434");
    // The file's watch list counts as much as the command line's.
    assert_eq!(
        run_probes(
            &[],
            Some("[run]\nwatch = [\"8080=gateway\", \"11500=upstream\"]")
        ),
        "127.0.0.1:11500"
    );
}

#[test]
fn run_without_a_watched_upstream_probes_ollamas_default_address() {
    assert_eq!(
        run_probes(&["--watch", "18789=gateway"], None),
        "127.0.0.1:11434"
    );
}

#[test]
fn an_upstream_given_anywhere_wins_over_the_watched_one() {
    let watch = ["--watch", "11500=upstream"];
    let flag = [&watch[..], &["--upstream", "10.0.0.7:11434"]].concat();
    assert_eq!(run_probes(&flag, None), "10.0.0.7:11434");
    // Even when it names the default address: given is given.
    let flag = [&watch[..], &["--upstream", "127.0.0.1:11434"]].concat();
    assert_eq!(run_probes(&flag, None), "127.0.0.1:11434");
    // From the config file, at the top level or in [run].
    let top = "upstream = \"ollama.internal:8000\"\n[run]\nwatch = [\"11500=upstream\"]";
    assert_eq!(run_probes(&[], Some(top)), "ollama.internal:8000");
    let table = "[run]\nupstream = \"http://[::1]:11500\"";
    assert_eq!(run_probes(&watch, Some(table)), "[::1]:11500");
    // The command line wins over the file, as for every setting.
    let both = [&watch[..], &["--upstream", "10.0.0.7:1"]].concat();
    assert_eq!(run_probes(&both, Some(top)), "10.0.0.7:1");
}

#[test]
fn probe_and_proxy_keep_ollamas_default_address() {
    match parse(&["probe"], None) {
        Command::Probe(args) => assert_eq!(args.upstream().to_string(), "127.0.0.1:11434"),
        other => panic!("not probe: {other:?}"),
    }
    match parse(&["probe", "--upstream", "h"], None) {
        Command::Probe(args) => assert_eq!(args.upstream().to_string(), "h:11434"),
        other => panic!("not probe: {other:?}"),
    }
    // The proxy forwards to its upstream: only --upstream says where, never a watch list.
    match parse(&["proxy"], None) {
        Command::Proxy(args) => {
            assert_eq!(args.probe.probe.upstream().to_string(), "127.0.0.1:11434");
        }
        other => panic!("not proxy: {other:?}"),
    }
}
