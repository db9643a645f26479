use std::{ffi::OsString, net::SocketAddr, path::Path, time::Duration};

use clap::{Arg, ArgAction, CommandFactory as _, FromArgMatches as _};

use super::*;
use crate::cli::{Cli, Command as Sub, UsageError};
use observer::base::{Role, WatchedPort};

const FILE: &str = "/etc/observer.toml";

fn argv(args: &[&str]) -> Vec<OsString> {
    std::iter::once("observer")
        .chain(args.iter().copied())
        .map(OsString::from)
        .collect()
}

/// `observer ARGS --config /etc/observer.toml` with the file holding `text`.
fn parse(args: &[&str], text: &str) -> Result<Cli, ParseError> {
    let mut args = args.to_vec();
    args.extend(["--config", FILE]);
    let matches = get_matches(Cli::command(), argv(&args), |path| {
        assert_eq!(path, Path::new(FILE));
        Ok(ConfigFile::new(path, text))
    })?;
    Ok(Cli::from_arg_matches(&matches).expect("matches make a Cli"))
}

fn config_error(args: &[&str], text: &str) -> ConfigError {
    match parse(args, text) {
        Err(ParseError::Config(err)) => err,
        Err(ParseError::Clap(err)) => panic!("clap error instead of a config error: {err}"),
        Ok(cli) => panic!("parsed: {cli:?}"),
    }
}

fn proxy(cli: Cli) -> observer::proxy::ProxyArgs {
    match cli.command {
        Sub::Proxy(args) => *args,
        other => panic!("not proxy: {other:?}"),
    }
}

fn run(cli: &Cli) -> &observer::run::RunArgs {
    match &cli.command {
        Sub::Run(args) => args,
        other => panic!("not run: {other:?}"),
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn the_files_settings_take_effect_in_every_shape() {
    let cli = parse(
        &["proxy"],
        r#"
log = "debug"
log_format = "json"
listen = "127.0.0.1:1800"
metrics-addr = "127.0.0.1:1801"
no-probe = true
forwarded-for = false
model = ["llama3.2:1b", "qwen2.5:0.5b"]
route = "/api/custom"
max-body-bytes = 0x400
timeout = "2m"
"#,
    )
    .unwrap();
    assert_eq!(cli.log, "debug");
    assert_eq!(cli.log_format, crate::cli::LogFormat::Json);
    let args = proxy(cli);
    assert_eq!(args.listen, addr("127.0.0.1:1800"));
    assert_eq!(args.metrics.metrics_addr, addr("127.0.0.1:1801"));
    assert!(args.probe.no_probe);
    assert!(!args.forwarded_for);
    assert_eq!(args.probe.probe.models, ["llama3.2:1b", "qwen2.5:0.5b"]);
    assert_eq!(args.metrics.routes, ["/api/custom"]);
    assert_eq!(args.max_body_bytes, 1024);
    assert_eq!(args.timeout, Duration::from_secs(120));
    // Untouched flags keep their defaults.
    assert_eq!(args.max_conns, 1024);
}

#[test]
fn the_command_line_wins_over_the_file() {
    let text = r#"
metrics-addr = "127.0.0.1:1801"
watch = ["1000=gateway", "1001=upstream"]
ring-bytes = 65536
log = "debug"
"#;
    let cli = parse(
        &[
            "--log",
            "warn",
            "run",
            "--metrics-addr",
            "127.0.0.1:2801",
            "--watch",
            "2000=upstream",
        ],
        text,
    )
    .unwrap();
    assert_eq!(cli.log, "warn");
    let args = run(&cli);
    assert_eq!(args.metrics.metrics_addr, addr("127.0.0.1:2801"));
    // A list from the command line replaces the file's, it is not merged with it.
    assert_eq!(
        args.capture.watch,
        [WatchedPort {
            port: 2000,
            role: Role::Upstream
        }]
    );
    // What the command line left alone still comes from the file.
    assert_eq!(args.capture.ring_bytes, 65536);
    // A global flag after the subcommand counts as given too.
    let cli = parse(&["run", "--log", "error"], text).unwrap();
    assert_eq!(cli.log, "error");
}

/// The environment comes between the command line and the file: `PATH` is set wherever tests
/// run, so an argument read from it shows the order without touching the environment.
#[test]
fn the_environment_wins_over_the_file_and_loses_to_the_command_line() {
    let cli = || {
        clap::Command::new("observer")
            .arg(
                Arg::new(CONFIG_ARG)
                    .long("config")
                    .global(true)
                    .value_parser(clap::value_parser!(PathBuf)),
            )
            .subcommand(
                clap::Command::new("run")
                    .arg(Arg::new("dirs").long("dirs").env("PATH"))
                    .arg(
                        Arg::new("name")
                            .long("name")
                            .env("OBSERVER_TEST_SURELY_UNSET_VARIABLE"),
                    ),
            )
    };
    let file = |path: &Path| {
        Ok(ConfigFile::new(
            path,
            "dirs = \"from-file\"\nname = \"from-file\"",
        ))
    };
    let path = std::env::var("PATH").expect("PATH is set");
    let matches = get_matches(cli(), argv(&["run", "--config", FILE]), file).unwrap();
    let (_, run) = matches.subcommand().unwrap();
    assert_eq!(run.get_one::<String>("dirs"), Some(&path));
    assert_eq!(run.get_one::<String>("name").unwrap(), "from-file");
    let matches = get_matches(
        cli(),
        argv(&["run", "--config", FILE, "--dirs", "from-flag"]),
        file,
    )
    .unwrap();
    let (_, run) = matches.subcommand().unwrap();
    assert_eq!(run.get_one::<String>("dirs").unwrap(), "from-flag");
}

#[test]
fn the_subcommands_table_wins_over_the_top_level_and_other_tables_are_left_alone() {
    let text = r#"
metrics-addr = "127.0.0.1:1000"
log = "info"

[run]
metrics-addr = "127.0.0.1:1001"
watch = ["1002=gateway"]

[proxy]
metrics_addr = "127.0.0.1:1003"
listen = "127.0.0.1:1004"
max-conns = 0

[metrics-reference]
list = true
"#;
    let cli = parse(&["run"], text).unwrap();
    assert_eq!(run(&cli).metrics.metrics_addr, addr("127.0.0.1:1001"));
    assert_eq!(run(&cli).capture.watch.len(), 1);
    // `max-conns = 0` is wrong for the proxy, which is not the one running.
    let args = proxy(parse(&["proxy", "--max-conns", "3"], text).unwrap());
    assert_eq!(args.metrics.metrics_addr, addr("127.0.0.1:1003"));
    assert_eq!(args.listen, addr("127.0.0.1:1004"));
    let cli = parse(&["metrics-reference"], "[metrics_reference]\nlist = true").unwrap();
    assert!(matches!(cli.command, Sub::MetricsReference(ref args) if args.list));
}

#[test]
fn a_syntax_error_names_the_line_and_column() {
    let err = config_error(&["run"], "log = \"debug\"\nmetrics-addr = 127.0.0.1:9464\n");
    let ConfigError::Syntax { place, column, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(place.line, Some(2));
    assert!(*column > 1, "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with("config file /etc/observer.toml:2:"),
        "{text}"
    );
    assert!(!text.contains('\n'), "one line: {text:?}");
    // TOML forbids a key twice in one table.
    let err = config_error(&["run"], "log = \"a\"\nlog = \"b\"\n");
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
}

#[test]
fn an_unknown_key_is_named_with_its_section_and_a_hint() {
    let err = config_error(&["run"], "\nmetrics-adr = \"127.0.0.1:1\"");
    assert_eq!(
        err.to_string(),
        "config file /etc/observer.toml:2: unknown key `metrics-adr` for `observer run`; \
         did you mean `metrics-addr`?"
    );
    let err = config_error(&["run"], "[run]\nlisten = \"127.0.0.1:1\"");
    assert_eq!(
        err.to_string(),
        "config file /etc/observer.toml:2: unknown key `listen` in [run]; it is a flag of \
         `observer sim` and `observer proxy`, not of `observer run`: put it in a [sim] or \
         [proxy] table"
    );
    let err = config_error(&["proxy"], "frobnicate = 1");
    assert!(
        err.to_string()
            .ends_with("the keys are the long flags of `observer proxy --help`"),
        "{err}"
    );
    // A typo in another subcommand's table is caught now, not when that one runs.
    let err = config_error(&["run"], "[proxy]\nlisen = \"127.0.0.1:1\"");
    assert!(
        err.to_string()
            .contains("unknown key `lisen` in [proxy]; did you mean `listen`?"),
        "{err}"
    );
    // `[[run]]` is an array of tables, not the run table.
    let err = config_error(&["run"], "[[run]]\nlog = \"debug\"");
    assert!(err.to_string().contains("go in a [run] table"), "{err}");
    // The first mistake in the file is the one reported (the parser sorts keys by name).
    let err = config_error(&["run"], "zzz = 1\naaa = 2");
    assert!(
        matches!(&err, ConfigError::UnknownKey { key, .. } if key == "zzz"),
        "{err:?}"
    );
    // A table that is no subcommand.
    let err = config_error(&["run"], "[server]\nport = 1");
    assert!(
        matches!(&err, ConfigError::UnknownKey { key, .. } if key == "server"),
        "{err:?}"
    );
}

#[test]
fn a_value_of_the_wrong_shape_is_refused() {
    let cases = [
        (
            "metrics-addr = [\"127.0.0.1:1\"]",
            "`metrics-addr` takes one value, not an array",
        ),
        (
            "no-probe = \"yes\"",
            "`no-probe` is a switch: true or false, not a string",
        ),
        (
            "no-probe = 1",
            "`no-probe` is a switch: true or false, not an integer",
        ),
        (
            "metrics-addr = { host = \"h\" }",
            "`metrics-addr` takes a value, not a table",
        ),
        (
            "[metrics-addr]\nhost = \"h\"",
            "`metrics-addr` takes a value, not a table",
        ),
        (
            "exec-cooldown = 1979-05-27T07:32:00Z",
            "`exec-cooldown` takes a value, not a date-time",
        ),
        (
            "watch = [[\"1=gateway\"]]",
            "`watch` takes a list of values, and an element is an array",
        ),
        (
            "metrics-addr = \"127.0.0.1:1\"\nmetrics_addr = \"127.0.0.1:2\"",
            "`metrics_addr` sets --metrics-addr again (after `metrics-addr`)",
        ),
    ];
    for (text, expect) in cases {
        let err = config_error(&["run"], text);
        assert!(
            matches!(err, ConfigError::Shape { .. }),
            "{text:?}: {err:?}"
        );
        assert!(err.to_string().contains(expect), "{text:?}: {err}");
    }
}

#[test]
fn a_value_clap_refuses_is_named_by_file_line_and_key() {
    let cases = [
        (
            "metrics-addr = \"nope\"",
            "metrics-addr",
            "invalid value 'nope' for '--metrics-addr <ADDR>'",
        ),
        (
            "ring-bytes = -1",
            "ring-bytes",
            "invalid value '-1' for '--ring-bytes <N>'",
        ),
        ("watch = [\"x=y\"]", "watch", "\"x\" is not a port number"),
        (
            "gpu = \"sometimes\"",
            "gpu",
            "invalid value 'sometimes' for '--gpu <GPU>'",
        ),
        (
            "probe-tcp-interval = \"soon\"",
            "probe-tcp-interval",
            "e.g. 5s",
        ),
    ];
    for (text, key, expect) in cases {
        let err = config_error(&["run"], &format!("log = \"info\"\n{text}"));
        let ConfigError::Invalid {
            place, key: named, ..
        } = &err
        else {
            panic!("{text:?}: {err:?}");
        };
        assert_eq!(place.line, Some(2), "{err}");
        assert_eq!(named, key);
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("config file /etc/observer.toml:2: `{key}`: ")),
            "{text}"
        );
        assert!(text.contains(expect), "{text}");
        assert!(!text.contains('\n'), "{text:?}");
    }
}

#[test]
fn config_help_and_version_cannot_be_keys() {
    for key in ["config", "help", "version"] {
        let err = config_error(&["run"], &format!("{key} = \"x\""));
        assert_eq!(
            err.to_string(),
            format!("config file /etc/observer.toml:1: `{key}` cannot be set in a config file")
        );
    }
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let err = ConfigFile::read(Path::new("/nonexistent/observer.toml")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("cannot read config file /nonexistent/observer.toml: "),
        "{text}"
    );
    assert!(text.contains("No such file"), "{text}");
}

#[test]
fn an_empty_file_changes_nothing() {
    let cli = parse(&["run"], "# nothing yet\n").unwrap();
    assert_eq!(run(&cli).metrics.metrics_addr, addr("127.0.0.1:9464"));
    assert_eq!(run(&cli).capture.watch.len(), 2);
}

/// The whole path of the binary: the file read from disk, and settings that parse but do not
/// fit together refused before anything starts.
#[test]
fn cli_reads_the_file_and_checks_the_settings() {
    let dir = std::env::temp_dir().join(format!("observer-config-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("observer.toml");
    std::fs::write(&path, "[run]\nring-bytes = 3\n").unwrap();
    let args = |sub: &str| argv(&[sub, "--config", path.to_str().unwrap(), "--no-probe"]);
    match Cli::parse_args(args("run")) {
        Err(UsageError::Settings(err)) => {
            assert!(err.to_string().contains("ring buffer size 3"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    std::fs::write(&path, "[run]\nring-bytes = 8192\n").unwrap();
    let cli = Cli::parse_args(args("run")).unwrap();
    assert_eq!(run(&cli).capture.ring_bytes, 8192);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(
        Cli::parse_args(args("run")),
        Err(UsageError::Config(ConfigError::Read { .. }))
    ));
}

#[test]
fn switches_and_lists_become_flags() {
    let mut cmd = Cli::command();
    cmd.build();
    let base = cmd.clone().try_get_matches_from(argv(&["run"])).unwrap();
    let settings = ConfigFile::new(
        FILE,
        "no-probe = false\ninclude-self = true\nwatch = [\"1=gateway\", \"2=upstream\"]\nhead-bytes = 64",
    )
    .settings(&cmd, &base)
    .unwrap();
    assert_eq!(
        settings.args(),
        [
            "--include-self",
            "--watch=1=gateway",
            "--watch=2=upstream",
            "--head-bytes=64"
        ]
        .map(OsString::from)
    );
    assert!(matches!(
        cmd.find_subcommand("run")
            .unwrap()
            .get_arguments()
            .find(|a| a.get_long() == Some("no-probe"))
            .unwrap()
            .get_action(),
        ArgAction::SetTrue
    ));
}

/// The example in `deploy/` is valid for both daemons, and its tables say different things.
#[test]
fn the_deploy_example_serves_run_and_proxy() {
    let example = include_str!("../../../../../deploy/observer.toml");
    let cli = parse(&["run"], example).unwrap();
    assert_eq!(run(&cli).capture.max_conns, 65536);
    assert_eq!(run(&cli).metrics.metrics_addr, addr("127.0.0.1:9464"));
    let args = proxy(parse(&["proxy"], example).unwrap());
    assert_eq!(args.max_conns, 1024);
    assert_eq!(args.listen, addr("0.0.0.0:18789"));
    assert_eq!(args.drain_timeout, Duration::from_secs(30));
}

#[test]
fn line_and_column_count_from_one() {
    assert_eq!(line_column("ab\ncd", 0), (1, 1));
    assert_eq!(line_column("ab\ncd", 4), (2, 2));
    assert_eq!(edit_distance("metrics-adr", "metrics-addr"), 1);
    assert_eq!(edit_distance("", "abc"), 3);
}
