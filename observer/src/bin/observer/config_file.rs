//! `--config FILE`: settings from a TOML file, for what neither the command line nor an
//! `OBSERVER_*` variable set.
//!
//! The file's keys are the long flag names of the subcommand being run (`metrics-addr`, or
//! `metrics_addr`); top-level keys apply to that subcommand, a `[run]`, `[proxy]`, ... table only
//! to its subcommand, and wins over the top level. The command line is parsed once, then each
//! setting the file gives for an argument whose value came from neither the command line nor
//! the environment is appended as `--flag=value`, and the whole parsed again, so clap checks
//! the file's values with the very parsers it uses for flags.
//!
//! It owns the file's shape and its errors; it knows no flag by name (those live beside their
//! subcommands) and starts nothing. Nothing in the file is ignored except the tables of other
//! subcommands, whose key names are still checked.

use std::{
    collections::HashMap,
    ffi::OsString,
    fmt, io,
    path::{Path, PathBuf},
};

use clap::{
    Arg, ArgAction, ArgMatches, Command,
    error::{ContextKind, ContextValue},
    parser::ValueSource,
};
use toml::{
    Spanned,
    de::{DeString, DeTable, DeValue},
};

/// Id of the global `--config` argument in the command.
pub const CONFIG_ARG: &str = "config";

/// Keys that steer the command line itself rather than name a setting.
const RESERVED: [&str; 3] = ["config", "help", "version"];

/// Where in the file something is: the path, and the line where known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub path: PathBuf,
    pub line: Option<usize>,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config file {}", self.path.display())?;
        match self.line {
            Some(line) => write!(f, ":{line}"),
            None => Ok(()),
        }
    }
}

/// A config file that cannot be used; the process must stop before starting anything.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("{place}:{column}: invalid TOML: {message}")]
    Syntax {
        place: Place,
        column: usize,
        message: String,
    },
    #[error("{place}: unknown key `{key}` {section}; {hint}")]
    UnknownKey {
        place: Place,
        key: String,
        section: String,
        hint: String,
    },
    #[error("{place}: `{key}` cannot be set in a config file")]
    Reserved { place: Place, key: String },
    #[error("{place}: `{key}` {problem}")]
    Shape {
        place: Place,
        key: String,
        problem: String,
    },
    /// A value clap rejected, with clap's message.
    #[error("{place}: `{key}`: {message}")]
    Invalid {
        place: Place,
        key: String,
        message: String,
    },
}

/// Why the arguments did not parse: clap's own error (the command line or the environment),
/// or the config file's.
#[derive(Debug)]
pub enum ParseError {
    Clap(clap::Error),
    Config(ConfigError),
}

impl From<ConfigError> for ParseError {
    fn from(err: ConfigError) -> Self {
        ParseError::Config(err)
    }
}

/// Parses `argv` against `cli`, completed by the config file that `--config` or
/// `OBSERVER_CONFIG` names, read with `read`.
pub fn get_matches(
    mut cli: Command,
    argv: Vec<OsString>,
    read: impl FnOnce(&Path) -> Result<ConfigFile, ConfigError>,
) -> Result<ArgMatches, ParseError> {
    // Built once so that the global flags are part of each subcommand when it is looked at.
    cli.build();
    let matches = cli
        .clone()
        .try_get_matches_from(&argv)
        .map_err(ParseError::Clap)?;
    let Some(path) = matches.get_one::<PathBuf>(CONFIG_ARG) else {
        return Ok(matches);
    };
    let settings = read(path)?.settings(&cli, &matches)?;
    if settings.entries.is_empty() {
        return Ok(matches);
    }
    let mut full = argv;
    full.extend(settings.args());
    cli.try_get_matches_from(full)
        .map_err(|err| ParseError::Config(settings.explain(&err)))
}

/// The text of a config file.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    path: PathBuf,
    text: String,
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        std::fs::read_to_string(path)
            .map(|text| ConfigFile::new(path, text))
            .map_err(|error| ConfigError::Read {
                path: path.to_owned(),
                error,
            })
    }

    pub fn new(path: impl Into<PathBuf>, text: impl Into<String>) -> ConfigFile {
        ConfigFile {
            path: path.into(),
            text: text.into(),
        }
    }

    /// The file's settings for the subcommand `matches` chose, without those whose argument the
    /// command line or the environment already set.
    pub fn settings(&self, cli: &Command, matches: &ArgMatches) -> Result<Settings, ConfigError> {
        let doc = DeTable::parse(&self.text).map_err(|err| self.syntax(&err))?;
        let mut settings = Settings {
            path: self.path.clone(),
            entries: Vec::new(),
        };
        let Some((name, sub_matches)) = matches.subcommand() else {
            return Ok(settings);
        };
        let sub = cli
            .find_subcommand(name)
            .expect("clap matched this subcommand");
        let mut top = Vec::new();
        let mut own = Vec::new();
        for (key, value) in in_file_order(doc.get_ref()) {
            if let (DeValue::Table(table), Some(other)) =
                (value.get_ref(), find_subcommand(cli, key.get_ref()))
            {
                if other.get_name() == name {
                    for (key, value) in in_file_order(table) {
                        own.push(self.entry(cli, sub, Some(name), key, value)?);
                    }
                } else {
                    self.check_names(cli, other, table)?;
                }
                continue;
            }
            top.push(self.entry(cli, sub, None, key, value)?);
        }
        let (top, own) = (self.distinct(top)?, self.distinct(own)?);
        // The subcommand's table is the more specific: it wins over the top level.
        let mut chosen: Vec<Entry> = top
            .into_iter()
            .filter(|t| !own.iter().any(|o| o.id == t.id))
            .collect();
        chosen.extend(own);
        chosen.retain(|e| {
            !matches!(
                sub_matches.value_source(&e.id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        });
        // In the file's order, so that clap reports the first bad value first.
        chosen.sort_by_key(|e| e.offset);
        settings.entries = chosen;
        Ok(settings)
    }

    fn place(&self, offset: usize) -> Place {
        Place {
            path: self.path.clone(),
            line: Some(line_column(&self.text, offset).0),
        }
    }

    fn syntax(&self, err: &toml::de::Error) -> ConfigError {
        let (line, column) = err.span().map_or((None, 0), |span| {
            let (line, column) = line_column(&self.text, span.start);
            (Some(line), column)
        });
        ConfigError::Syntax {
            place: Place {
                path: self.path.clone(),
                line,
            },
            column,
            message: err.message().trim_end().replace('\n', "; "),
        }
    }

    /// One key of the top level (`table` None) or of the subcommand's table, as an argument.
    fn entry(
        &self,
        cli: &Command,
        sub: &Command,
        table: Option<&str>,
        key: &Key<'_>,
        value: &Value<'_>,
    ) -> Result<Entry, ConfigError> {
        let offset = key.span().start;
        let name = key.get_ref().to_string();
        let arg = self.find_arg(cli, sub, table, key)?;
        let shape = |problem: String| ConfigError::Shape {
            place: self.place(offset),
            key: name.clone(),
            problem,
        };
        let values = match (arg.get_action(), value.get_ref()) {
            (ArgAction::SetTrue | ArgAction::SetFalse, DeValue::Boolean(on)) => {
                return Ok(Entry {
                    id: arg.get_id().to_string(),
                    key: name,
                    long: long_of(arg),
                    offset,
                    line: line_column(&self.text, offset).0,
                    values: Vec::new(),
                    switch: Some(*on),
                });
            }
            (ArgAction::SetTrue | ArgAction::SetFalse, other) => {
                return Err(shape(format!(
                    "is a switch: true or false, not {}",
                    describe(other)
                )));
            }
            (ArgAction::Append, DeValue::Array(items)) => items
                .iter()
                .map(|item| scalar(item.get_ref()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|what| {
                    shape(format!("takes a list of values, and an element is {what}"))
                })?,
            (ArgAction::Set, DeValue::Array(_)) => {
                return Err(shape("takes one value, not an array".into()));
            }
            (ArgAction::Set | ArgAction::Append, other) => {
                vec![scalar(other).map_err(|what| shape(format!("takes a value, not {what}")))?]
            }
            (action, _) => {
                return Err(shape(format!(
                    "cannot be set in a config file ({action:?} flag)"
                )));
            }
        };
        Ok(Entry {
            id: arg.get_id().to_string(),
            key: name,
            long: long_of(arg),
            offset,
            line: line_column(&self.text, offset).0,
            values,
            switch: None,
        })
    }

    /// The argument a key names, or why it names none.
    fn find_arg<'c>(
        &self,
        cli: &Command,
        sub: &'c Command,
        table: Option<&str>,
        key: &Key<'_>,
    ) -> Result<&'c Arg, ConfigError> {
        let name = key.get_ref();
        let long = name.replace('_', "-");
        if RESERVED.contains(&long.as_str()) {
            return Err(ConfigError::Reserved {
                place: self.place(key.span().start),
                key: name.to_string(),
            });
        }
        sub.get_arguments()
            .find(|arg| arg.get_long() == Some(long.as_str()))
            .ok_or_else(|| ConfigError::UnknownKey {
                place: self.place(key.span().start),
                key: name.to_string(),
                section: match table {
                    Some(table) => format!("in [{table}]"),
                    None => format!("for `{} {}`", cli.get_name(), sub.get_name()),
                },
                hint: hint(cli, sub, &long),
            })
    }

    /// The keys of another subcommand's table must name its flags; their values are checked
    /// when that subcommand runs.
    fn check_names(
        &self,
        cli: &Command,
        other: &Command,
        table: &DeTable<'_>,
    ) -> Result<(), ConfigError> {
        for (key, _) in in_file_order(table) {
            self.find_arg(cli, other, Some(other.get_name()), key)?;
        }
        Ok(())
    }

    /// Two spellings of one flag in one section (`metrics-addr` and `metrics_addr`) are an error.
    fn distinct(&self, entries: Vec<Entry>) -> Result<Vec<Entry>, ConfigError> {
        let mut seen: HashMap<&str, &Entry> = HashMap::new();
        for entry in &entries {
            if let Some(first) = seen.insert(&entry.id, entry) {
                return Err(ConfigError::Shape {
                    place: self.place(entry.offset),
                    key: entry.key.clone(),
                    problem: format!("sets --{} again (after `{}`)", entry.long, first.key),
                });
            }
        }
        Ok(entries)
    }
}

/// The file's settings that apply, in the file's order.
#[derive(Debug, Clone)]
pub struct Settings {
    path: PathBuf,
    entries: Vec<Entry>,
}

/// One key as arguments.
#[derive(Debug, Clone)]
struct Entry {
    /// clap's id of the argument.
    id: String,
    /// The key as the file spells it.
    key: String,
    long: String,
    /// Byte offset of the key in the file, and its line.
    offset: usize,
    line: usize,
    values: Vec<String>,
    /// For a switch: whether it is on.
    switch: Option<bool>,
}

impl Settings {
    /// `--flag=value` for each value, the bare switch for `true`, nothing for `false`.
    pub fn args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        for entry in &self.entries {
            match entry.switch {
                Some(true) => args.push(format!("--{}", entry.long).into()),
                Some(false) => {}
                None => args.extend(
                    entry
                        .values
                        .iter()
                        .map(|value| format!("--{}={value}", entry.long).into()),
                ),
            }
        }
        args
    }

    /// A clap error of the second parse, which can only come from the file's values: named by
    /// the file, line and key.
    pub fn explain(&self, err: &clap::Error) -> ConfigError {
        let message = err.render().to_string();
        let message = message
            .lines()
            .next()
            .unwrap_or("invalid value")
            .trim_start_matches("error: ")
            .to_owned();
        let long = match err.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(arg)) => arg
                .trim_start_matches("--")
                .split([' ', '='])
                .next()
                .map(str::to_owned),
            _ => None,
        };
        let entry = long.and_then(|long| self.entries.iter().find(|e| e.long == long));
        let (line, key) = match entry {
            Some(entry) => (Some(entry.line), entry.key.clone()),
            None => (
                None,
                self.entries
                    .iter()
                    .map(|e| e.key.as_str())
                    .collect::<Vec<_>>()
                    .join("`, `"),
            ),
        };
        ConfigError::Invalid {
            place: Place {
                path: self.path.clone(),
                line,
            },
            key,
            message,
        }
    }
}

type Key<'i> = Spanned<DeString<'i>>;
type Value<'i> = Spanned<DeValue<'i>>;

/// A table's entries as they come in the file (the parser keeps them sorted by name), so that
/// the first mistake reported is the first in the file.
fn in_file_order<'t, 'i>(table: &'t DeTable<'i>) -> Vec<(&'t Key<'i>, &'t Value<'i>)> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    entries
}

fn long_of(arg: &Arg) -> String {
    arg.get_long()
        .expect("only arguments with a long name are looked up")
        .to_owned()
}

/// A subcommand by a table's name (`metrics-reference` or `metrics_reference`).
fn find_subcommand<'c>(cli: &'c Command, name: &str) -> Option<&'c Command> {
    cli.find_subcommand(name.replace('_', "-"))
}

/// A scalar value as the text a flag would carry; what it is when it is no scalar.
fn scalar(value: &DeValue<'_>) -> Result<String, &'static str> {
    match value {
        DeValue::String(text) => Ok(text.to_string()),
        DeValue::Integer(int) => Ok(i128::from_str_radix(int.as_str(), int.radix())
            .map_or_else(|_| int.to_string(), |n| n.to_string())),
        DeValue::Float(float) => Ok(float.as_str().to_owned()),
        DeValue::Boolean(on) => Ok(on.to_string()),
        other => Err(describe(other)),
    }
}

fn describe(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// What to say about a key that names no flag of `sub`: the subcommands it is a flag of, else
/// the closest flag's name.
fn hint(cli: &Command, sub: &Command, long: &str) -> String {
    if let Some(table) = find_subcommand(cli, long) {
        return format!(
            "the settings of `{} {}` go in a [{}] table",
            cli.get_name(),
            table.get_name(),
            table.get_name()
        );
    }
    let elsewhere: Vec<&str> = cli
        .get_subcommands()
        .filter(|other| other.get_name() != sub.get_name())
        .filter(|other| other.get_arguments().any(|a| a.get_long() == Some(long)))
        .map(Command::get_name)
        .collect();
    if !elsewhere.is_empty() {
        let commands: Vec<String> = elsewhere
            .iter()
            .map(|name| format!("`{} {name}`", cli.get_name()))
            .collect();
        let tables: Vec<String> = elsewhere.iter().map(|name| format!("[{name}]")).collect();
        return format!(
            "it is a flag of {}, not of `{} {}`: put it in a {} table",
            listing(&commands, "and"),
            cli.get_name(),
            sub.get_name(),
            listing(&tables, "or")
        );
    }
    let closest = sub
        .get_arguments()
        .filter_map(Arg::get_long)
        .filter(|name| !RESERVED.contains(name))
        .map(|name| (edit_distance(long, name), name))
        .min();
    match closest {
        Some((distance, name)) if distance <= 2.max(long.len() / 4) => {
            format!("did you mean `{name}`?")
        }
        _ => format!(
            "the keys are the long flags of `{} {} --help`",
            cli.get_name(),
            sub.get_name()
        ),
    }
}

/// `a`, `a and b`, `a, b and c`.
fn listing(items: &[String], last: &str) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., tail] => format!("{} {last} {tail}", init.join(", ")),
    }
}

/// Levenshtein distance, for suggesting a flag's name.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod probe_tests;
#[cfg(test)]
mod tests;
