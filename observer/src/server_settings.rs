//! How full the model server can get: Ollama's own settings, read zero-touch from the
//! environment of the process that owns the upstream listener (`/proc/<pid>/environ`, which
//! only root, or the same user, may read).
//!
//! Owns the parsing, done the way Ollama's `envconfig` does it (values trimmed of spaces and
//! quotes; an unparsable value falls back to the default; `OLLAMA_KEEP_ALIVE` is a Go duration
//! or whole seconds, negative meaning forever), and the choice of processes: the upstream
//! listeners' owners, not their descendants (Ollama's runners inherit the same environment).

use std::{collections::HashSet, fs, path::Path, time::Duration};

use crate::base::Role;
use crate::procfs::{Targets, parse_stat};

/// The settings of one Ollama server, defaults filled in (Ollama 0.32, `envconfig/config.go`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// `OLLAMA_NUM_PARALLEL`: requests one loaded model runs at once (default 1).
    pub num_parallel: u64,
    /// `OLLAMA_MAX_QUEUE`: requests that may wait for a model before `503` (default 512).
    pub max_queue: u64,
    /// `OLLAMA_MAX_LOADED_MODELS`: 0 lets Ollama choose (3 per GPU).
    pub max_loaded_models: u64,
    /// `OLLAMA_CONTEXT_LENGTH`: 0 lets Ollama choose from the GPU memory (4k, 32k or 256k).
    pub context_length: u64,
    /// `OLLAMA_KEEP_ALIVE`: how long an idle model stays loaded; `None` is forever.
    pub keep_alive: Option<Duration>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            num_parallel: 1,
            max_queue: 512,
            max_loaded_models: 0,
            context_length: 0,
            keep_alive: Some(Duration::from_secs(300)),
        }
    }
}

impl ServerSettings {
    /// Settings from an environment block (`NAME=value` entries separated by NUL bytes).
    pub fn from_environ(environ: &[u8]) -> ServerSettings {
        let mut settings = ServerSettings::default();
        for entry in environ.split(|&b| b == 0) {
            let Ok(entry) = std::str::from_utf8(entry) else {
                continue;
            };
            let Some((name, value)) = entry.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches(['"', '\'']);
            if value.is_empty() {
                continue;
            }
            let slot = match name {
                "OLLAMA_NUM_PARALLEL" => &mut settings.num_parallel,
                "OLLAMA_MAX_QUEUE" => &mut settings.max_queue,
                "OLLAMA_MAX_LOADED_MODELS" => &mut settings.max_loaded_models,
                "OLLAMA_CONTEXT_LENGTH" => &mut settings.context_length,
                "OLLAMA_KEEP_ALIVE" => {
                    if let Some(keep_alive) = keep_alive(value) {
                        settings.keep_alive = keep_alive;
                    }
                    continue;
                }
                _ => continue,
            };
            // Go's strconv.ParseUint: digits only.
            if let Ok(n) = value.parse::<u64>() {
                *slot = n;
            }
        }
        settings
    }

    /// The label values of `llm_server_info`: num_parallel, max_queue, max_loaded_models,
    /// context_length (`auto` for Ollama's choice), keep_alive (seconds, or `forever`).
    pub fn labels(&self) -> [String; 5] {
        let auto = |n: u64| {
            if n == 0 {
                "auto".to_owned()
            } else {
                n.to_string()
            }
        };
        [
            self.num_parallel.to_string(),
            self.max_queue.to_string(),
            auto(self.max_loaded_models),
            auto(self.context_length),
            match self.keep_alive {
                Some(d) => format!("{}s", d.as_secs_f64()),
                None => "forever".to_owned(),
            },
        ]
    }
}

/// `OLLAMA_KEEP_ALIVE`: a Go duration (`5m`, `1h30m`, `-1s`) or whole seconds; negative is
/// forever (`Some(None)`). `None` when neither parses (Ollama keeps its default).
fn keep_alive(value: &str) -> Option<Option<Duration>> {
    let seconds = match go_duration_seconds(value) {
        Some(seconds) => seconds,
        None => value.parse::<i64>().ok()? as f64,
    };
    if seconds < 0.0 {
        Some(None)
    } else {
        Some(Some(Duration::from_secs_f64(seconds)))
    }
}

/// Go's `time.ParseDuration`, in seconds: an optional sign, then one or more decimal numbers
/// each with a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`); `0` alone is allowed.
fn go_duration_seconds(text: &str) -> Option<f64> {
    let (sign, mut rest) = match text.as_bytes().first()? {
        b'-' => (-1.0, &text[1..]),
        b'+' => (1.0, &text[1..]),
        _ => (1.0, text),
    };
    if rest == "0" {
        return Some(0.0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit_len..];
    }
    Some(sign * total)
}

/// The settings of each upstream listener's owner among `targets` (its descendants left
/// out), by pid. A process whose environment cannot be read is left out.
pub fn read(proc_root: &Path, targets: &Targets) -> Vec<(u32, ServerSettings)> {
    let upstream: HashSet<u32> = targets
        .iter()
        .filter(|t| t.role == Role::Upstream)
        .map(|t| t.pid)
        .collect();
    let mut servers = Vec::new();
    for target in targets.iter().filter(|t| t.role == Role::Upstream) {
        let dir = proc_root.join(target.pid.to_string());
        let parent_is_upstream = fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|stat| parse_stat(&stat))
            .is_some_and(|stat| upstream.contains(&stat.ppid));
        if parent_is_upstream {
            continue;
        }
        if let Ok(environ) = fs::read(dir.join("environ")) {
            servers.push((target.pid, ServerSettings::from_environ(&environ)));
        }
    }
    servers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_variables_take_ollamas_defaults() {
        let settings = ServerSettings::from_environ(b"PATH=/usr/bin\0HOME=/root\0");
        assert_eq!(settings, ServerSettings::default());
        assert_eq!(settings.labels(), ["1", "512", "auto", "auto", "300s"]);
    }

    #[test]
    fn values_are_parsed_as_ollama_does() {
        let environ = b"OLLAMA_NUM_PARALLEL=4\0OLLAMA_MAX_QUEUE= \"2\" \0OLLAMA_MAX_LOADED_MODELS=2\0OLLAMA_CONTEXT_LENGTH=8192\0OLLAMA_KEEP_ALIVE=1h30m\0";
        let settings = ServerSettings::from_environ(environ);
        assert_eq!(
            settings,
            ServerSettings {
                num_parallel: 4,
                max_queue: 2,
                max_loaded_models: 2,
                context_length: 8192,
                keep_alive: Some(Duration::from_secs(5400)),
            }
        );
        assert_eq!(settings.labels(), ["4", "2", "2", "8192", "5400s"]);
    }

    #[test]
    fn bad_values_keep_the_default_and_negative_keep_alive_is_forever() {
        let environ = b"OLLAMA_NUM_PARALLEL=-1\0OLLAMA_MAX_QUEUE=lots\0OLLAMA_KEEP_ALIVE=-1\0";
        let settings = ServerSettings::from_environ(environ);
        assert_eq!(settings.num_parallel, 1);
        assert_eq!(settings.max_queue, 512);
        assert_eq!(settings.keep_alive, None);
        assert_eq!(settings.labels()[4], "forever");
        for (value, want) in [
            ("600", Some(Some(Duration::from_secs(600)))),
            ("10m", Some(Some(Duration::from_secs(600)))),
            ("1.5s", Some(Some(Duration::from_millis(1500)))),
            ("0", Some(Some(Duration::ZERO))),
            ("-5m", Some(None)),
            ("5 minutes", None),
            ("m", None),
        ] {
            assert_eq!(keep_alive(value), want, "{value}");
        }
    }
}
