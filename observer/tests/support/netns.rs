//! Deployment topologies on the real kernel, for the `tests/deploy_*.rs` suites: network
//! namespaces (a container, a pod) joined to the host by a veth pair, a link between two of
//! them (two pods on one node), a nat OUTPUT DNAT into one (Docker without its userland proxy),
//! a single-process userland forwarder (docker-proxy), and processes in their own process group
//! that die with their handle (socat and its forked children, Python helpers).
//!
//! Everything is torn down by `Drop`, also when a test panics: the processes in a namespace are
//! killed, then its veth and the namespace deleted, an nft table deleted. A test binary killed
//! outright leaves its objects behind; the first topology a later run builds removes those of
//! processes that no longer exist (every name carries the creating process's id).
//!
//! Names: namespaces `obs-<tag>-<pid>-<n>`, interfaces `ob<pid in hex>-<n><side>`, nft tables
//! `obs_dnat_<pid>_<n>`. Addresses: one /30 per veth pair in 10.200.0.0–10.231.255.255, from
//! the process id and a counter, so the tests of one binary (run in parallel) never share a
//! subnet, and never one already on the host. Traffic only ever goes to loopback and to these
//! addresses.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// How long a helper process may take to say it is ready.
pub const START_WAIT: Duration = Duration::from_secs(10);

/// The Python helpers of these tests (standard library only).
pub const PY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/py");

/// The interpreter for the helpers: Debian's, else the one on `PATH`.
pub fn python() -> &'static str {
    match Path::new("/usr/bin/python3").exists() {
        true => "/usr/bin/python3",
        false => "python3",
    }
}

/// `program` in network namespace `netns` (`ip netns exec`, which execs it: the child's pid is
/// the program's), or on the host for `None`.
#[allow(unused_imports, reason = "each test binary uses a part of support")]
pub use testkit::process::command_in as command;

/// Fails with a hint when a tool these topologies need is missing.
pub fn require_tools(tools: &[&str]) {
    for tool in tools {
        let found = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
            || ["/usr/sbin", "/sbin"]
                .iter()
                .any(|dir| Path::new(dir).join(tool).is_file());
        assert!(found, "`{tool}` is missing: run scripts/setup.sh");
    }
}

/// Runs a command of the setup; a failure fails the test with its output.
fn sh(args: &[&str]) {
    let output = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("{args:?}: {err} (run scripts/setup.sh)"));
    assert!(
        output.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs a command of the cleanup: errors are ignored (the object may be gone already).
fn sh_quiet(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn pid() -> u32 {
    std::process::id()
}

/// A number unique in this process, for names and subnets.
fn next() -> u32 {
    static COUNT: AtomicU32 = AtomicU32::new(0);
    COUNT.fetch_add(1, Ordering::Relaxed)
}

/// A /30 nobody on the host uses: `(.1, .2)` of it.
fn subnet() -> (Ipv4Addr, Ipv4Addr) {
    // Subnets are handed out under a lock: two tests of this binary never race for one.
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap();
    let used = sh_quiet(&["ip", "-4", "-o", "addr", "show"]);
    loop {
        let n = next();
        assert!(n < 1024, "too many subnets in one test binary");
        let index = (pid() % 512) * 1024 + n;
        let base = u32::from(Ipv4Addr::new(10, 200, 0, 0)) + index * 4;
        let (one, two) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        // An address already on the host (another run's, another tool's): the next one.
        if !used.contains(&format!(" {one}/")) && !used.contains(&format!(" {two}/")) {
            return (one, two);
        }
    }
}

/// A port for a server that nothing holds on the host for a while (one in a namespace, or one
/// started after the daemon that watches its port): below the ephemeral range, where
/// `capture::free_port` and every client's local port come from, so no other test of this
/// binary can be handed it meanwhile (the daemon's hooks see a port in every namespace). One
/// per call, from the process id and a counter, and free on the host.
pub fn spare_port() -> u16 {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap();
    let first_ephemeral: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    const BASE: u32 = 10_000;
    assert!(
        first_ephemeral > BASE + 1000,
        "ephemeral ports from {first_ephemeral}"
    );
    let span = first_ephemeral - BASE;
    loop {
        let n = next();
        let port = (BASE + ((pid() % 1000) * 16 + n) % span) as u16;
        // Free on the host: a wildcard bind conflicts with any socket bound to the port.
        if std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            return port;
        }
    }
}

/// An interface name (at most 15 bytes): `ob<pid hex>-<n><side>`.
fn ifname(n: u32, side: char) -> String {
    let name = format!("ob{:x}-{n}{side}", pid());
    assert!(name.len() <= 15, "{name}");
    name
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Once per process: deletes the namespaces, interfaces and nft tables that earlier runs of
/// these tests left behind (their process is gone), so a killed run never piles up.
fn sweep_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for name in netns_names() {
            // obs-<tag>-<pid>-<n>
            let mut parts = name.rsplit('-');
            let (_, owner) = (parts.next(), parts.next().and_then(|p| p.parse().ok()));
            if let Some(owner) = owner.filter(|&o| !alive(o)) {
                eprintln!("removing network namespace {name} left by process {owner}");
                remove_netns(&name);
            }
        }
        for link in links() {
            let owner = link
                .strip_prefix("ob")
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(hex, _)| u32::from_str_radix(hex, 16).ok());
            if let Some(owner) = owner.filter(|&o| !alive(o)) {
                eprintln!("removing interface {link} left by process {owner}");
                sh_quiet(&["ip", "link", "del", &link]);
            }
        }
        for table in nft_tables() {
            let owner = table
                .strip_prefix("obs_dnat_")
                .and_then(|rest| rest.split('_').next())
                .and_then(|p| p.parse().ok());
            if let Some(owner) = owner.filter(|&o| !alive(o)) {
                eprintln!("removing nft table {table} left by process {owner}");
                sh_quiet(&["nft", "delete", "table", "ip", &table]);
            }
        }
    });
}

/// The network namespaces `ip netns list` shows that these tests name (`obs-…`).
pub fn netns_names() -> Vec<String> {
    sh_quiet(&["ip", "netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("obs-"))
        .map(str::to_owned)
        .collect()
}

/// The host's interfaces that these tests name (`ob<hex>-…`).
pub fn links() -> Vec<String> {
    sh_quiet(&["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| {
            n.strip_prefix("ob")
                .and_then(|rest| rest.split_once('-'))
                .is_some_and(|(hex, _)| u32::from_str_radix(hex, 16).is_ok())
        })
        .collect()
}

/// The nft tables of family ip that these tests name (`obs_dnat_…`).
pub fn nft_tables() -> Vec<String> {
    sh_quiet(&["nft", "list", "tables", "ip"])
        .lines()
        .filter_map(|l| l.strip_prefix("table ip "))
        .filter(|t| t.starts_with("obs_dnat_"))
        .map(|t| t.trim().to_owned())
        .collect()
}

/// Fails when any namespace, interface or nft table this process created still exists: for the
/// end of a test, after its topology was dropped.
pub fn assert_nothing_left(names: &[String]) {
    let netns: BTreeSet<String> = netns_names().into_iter().collect();
    let links: BTreeSet<String> = links().into_iter().collect();
    let tables: BTreeSet<String> = nft_tables().into_iter().collect();
    let left: Vec<&String> = names
        .iter()
        .filter(|n| netns.contains(*n) || links.contains(*n) || tables.contains(*n))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Every process in network namespace `name`.
fn netns_pids(name: &str) -> Vec<i32> {
    sh_quiet(&["ip", "netns", "pids", name])
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills every process in namespace `name` (each by its id, SIGKILL) until none is left, then
/// deletes the namespace.
fn remove_netns(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = netns_pids(name);
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            // SAFETY: kill has no memory preconditions; these are the processes this test
            // started in its own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..50 {
        sh_quiet(&["ip", "netns", "del", name]);
        if !netns_names().iter().any(|n| n == name) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("could not delete network namespace {name}");
}

/// A network namespace with `lo` up and a veth pair to the host: the host's end has `host_ip`,
/// the namespace's `ip` (one /30). It stands for a container or a pod: a server started in it
/// listens on `ip` (or on its loopback), and the host reaches it at `ip`.
pub struct Netns {
    pub name: String,
    /// The host's end of the veth pair.
    pub host_if: String,
    pub host_ip: Ipv4Addr,
    /// The namespace's address on its veth to the host.
    pub ip: Ipv4Addr,
    /// `sleep` in the namespace, whose `/proc/<pid>/net` is the namespace's table.
    anchor: Child,
}

impl Netns {
    /// `obs-<tag>-<pid>-<n>` (keep `tag` short: a word).
    pub fn new(tag: &str) -> Netns {
        require_tools(&["ip"]);
        sweep_stale();
        let n = next();
        let name = format!("obs-{tag}-{}-{n}", pid());
        let (host_if, inner_if) = (ifname(n, 'h'), ifname(n, 'n'));
        let (host_ip, ip) = subnet();
        sh(&["ip", "netns", "add", &name]);
        // From here on, a failure drops the half-built namespace.
        let anchor = command(Some(&name), "sleep")
            .arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("sleep in the namespace");
        let netns = Netns {
            name,
            host_if,
            host_ip,
            ip,
            anchor,
        };
        let name = netns.name.as_str();
        sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
        sh(&[
            "ip",
            "link",
            "add",
            &netns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &inner_if,
        ]);
        sh(&["ip", "link", "set", &inner_if, "netns", name]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &netns.host_if,
        ]);
        sh(&["ip", "link", "set", &netns.host_if, "up"]);
        sh(&[
            "ip",
            "-n",
            name,
            "addr",
            "add",
            &format!("{ip}/30"),
            "dev",
            &inner_if,
        ]);
        sh(&["ip", "-n", name, "link", "set", &inner_if, "up"]);
        netns.wait_for_pid_in_it();
        netns
    }

    /// `ip netns exec` has entered the namespace before it runs `sleep`; until then the
    /// anchor's `/proc/<pid>/net` is the host's.
    fn wait_for_pid_in_it(&self) {
        let deadline = Instant::now() + START_WAIT;
        while !netns_pids(&self.name).contains(&(self.anchor.id() as i32)) {
            assert!(
                Instant::now() < deadline,
                "sleep never ran in {}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The names this namespace owns on the host (namespace and veth), for
    /// [`assert_nothing_left`].
    pub fn names(&self) -> Vec<String> {
        vec![self.name.clone(), self.host_if.clone()]
    }

    /// `program` in this namespace; spawn it with [`Proc::spawn`] or as the helpers do.
    pub fn command(&self, program: &str) -> Command {
        command(Some(&self.name), program)
    }

    /// Starts `program args` in this namespace, in its own process group.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Proc {
        let mut cmd = self.command(program);
        cmd.args(args);
        Proc::spawn(cmd, &format!("{program} in {}", self.name))
    }

    /// `/proc/<pid>/net` of a process in the namespace: its `tcp`, `tcp6` are the namespace's.
    pub fn proc_net(&self) -> String {
        format!("/proc/{}/net", self.anchor.id())
    }

    /// Connections open on `port` on the namespace's side of it (see `faults::open_conns`).
    pub fn open_conns(&self, port: u16) -> u64 {
        super::faults::open_conns_at(&self.proc_net(), port)
    }

    /// Waits until something listens on `port` in the namespace.
    pub fn wait_listening(&self, port: u16) {
        wait_listening_at(&self.proc_net(), port);
    }

    /// A veth pair between two namespaces (two pods on one node, without going through the
    /// host: no forwarding on the host to turn on): `(a's address, b's address)` on it. The
    /// pair goes with the first of the two namespaces dropped.
    pub fn link(a: &Netns, b: &Netns) -> (Ipv4Addr, Ipv4Addr) {
        let n = next();
        let (a_if, b_if) = (ifname(n, 'a'), ifname(n, 'b'));
        let (a_ip, b_ip) = subnet();
        sh(&[
            "ip", "link", "add", &a_if, "type", "veth", "peer", "name", &b_if,
        ]);
        for (netns, ifname, ip) in [(a, &a_if, a_ip), (b, &b_if, b_ip)] {
            sh(&["ip", "link", "set", ifname, "netns", &netns.name]);
            let (name, ip) = (netns.name.as_str(), format!("{ip}/30"));
            sh(&["ip", "-n", name, "addr", "add", &ip, "dev", ifname]);
            sh(&["ip", "-n", name, "link", "set", ifname, "up"]);
        }
        (a_ip, b_ip)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove_netns(&self.name);
        let _ = self.anchor.kill();
        let _ = self.anchor.wait();
        // Deleting the namespace destroyed its veth end and with it the host's; in case not:
        sh_quiet(&["ip", "link", "del", &self.host_if]);
    }
}

/// Waits until `/proc/.../net/tcp{,6}` under `proc_net` shows a listener on `port`.
pub fn wait_listening_at(proc_net: &str, port: u16) {
    let deadline = Instant::now() + START_WAIT;
    while !listening_at(proc_net, port) {
        assert!(
            Instant::now() < deadline,
            "nothing listens on port {port} ({proc_net})"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a socket listens on `port` in the table under `proc_net` (`/proc/net`: the host's).
pub fn listening_at(proc_net: &str, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|table| {
        std::fs::read_to_string(format!("{proc_net}/{table}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let local_port = fields
                    .get(1)
                    .and_then(|l| l.rsplit(':').next())
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                // 0A: LISTEN.
                local_port == Some(port) && fields.get(3) == Some(&"0A")
            })
    })
}

/// nat OUTPUT DNAT, as Docker installs it without its userland proxy: locally originated TCP
/// to `from` goes to `to`. Removed on drop.
pub struct Dnat {
    pub table: String,
}

impl Dnat {
    pub fn new(from: SocketAddrV4, to: SocketAddrV4) -> Dnat {
        require_tools(&["nft"]);
        sweep_stale();
        let table = format!("obs_dnat_{}_{}", pid(), next());
        let rules = format!(
            "table ip {table} {{\n\
             \tchain output {{\n\
             \t\ttype nat hook output priority -100; policy accept;\n\
             \t\tip daddr {} tcp dport {} dnat to {to}\n\
             \t}}\n\
             }}\n",
            from.ip(),
            from.port()
        );
        let mut nft = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft (run scripts/setup.sh)");
        nft.stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        let output = nft.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "nft -f: {}\n{rules}",
            String::from_utf8_lossy(&output.stderr)
        );
        Dnat { table }
    }
}

impl Drop for Dnat {
    fn drop(&mut self) {
        sh_quiet(&["nft", "delete", "table", "ip", &self.table]);
    }
}

/// A child process in its own process group: dropping it kills the group (SIGKILL: the process
/// and whatever it forked) and reaps it. Its stdout lines can be awaited, and lines written to
/// its stdin.
pub struct Proc {
    child: Child,
    what: String,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Proc {
    /// Spawns `cmd` (stdin and stdout piped, stderr inherited: it shows in a failing test's
    /// output).
    pub fn spawn(mut cmd: Command, what: &str) -> Proc {
        cmd.process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|err| panic!("starting {what}: {err} (run scripts/setup.sh)"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            stdin: child.stdin.take(),
            child,
            what: what.to_owned(),
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line the process writes that starts with `prefix` (earlier lines are printed
    /// and skipped); fails if it exits or takes longer than `within`.
    pub fn expect_line(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(line) => eprintln!("{}: {line}", self.what),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{}: no line {prefix:?} within {within:?}", self.what)
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{} exited ({:?}) before writing {prefix:?}",
                    self.what,
                    self.child.try_wait()
                ),
            }
        }
    }

    /// Writes `line` and a newline to the process's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|err| panic!("{}: writing {line:?}: {err}", self.what));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; the group is our child's own.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A single-process userland forwarder, as docker-proxy is: it listens on `listen` and, for
/// every connection it accepts, connects to `target` and copies both ways (Python asyncio, one
/// thread, no fork). Returns once it listens.
pub fn forwarder(listen: SocketAddr, target: SocketAddr) -> Proc {
    let mut cmd = Command::new(python());
    cmd.arg(format!("{PY_DIR}/forwarder.py"))
        .arg(listen.to_string())
        .arg(target.to_string());
    let mut proc = Proc::spawn(cmd, "forwarder.py");
    proc.expect_line("forwarding", START_WAIT);
    proc
}

/// `socat TCP-LISTEN:<listen>,fork,reuseaddr TCP:<target>`: a relay that forks a child for
/// each connection it accepts (the child connects to `target`). Returns once it listens.
pub fn socat(listen: SocketAddr, target: SocketAddr) -> Proc {
    require_tools(&["socat"]);
    let (family, bind) = match listen {
        SocketAddr::V4(a) => ("TCP4", a.ip().to_string()),
        SocketAddr::V6(a) => ("TCP6", format!("[{}]", a.ip())),
    };
    let mut cmd = Command::new("socat");
    cmd.arg(format!(
        "{family}-LISTEN:{},bind={bind},fork,reuseaddr",
        listen.port(),
    ))
    .arg(format!("TCP:{target}"));
    let proc = Proc::spawn(cmd, "socat");
    wait_listening_at("/proc/net", listen.port());
    proc
}
