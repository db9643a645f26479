//! The memory figure: a contender's memory with many idle keep-alive clients.

use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, bail};
use testkit::http;

use crate::common::{PATH, machine};

/// A contender's memory before and with `count` idle keep-alive connections.
pub struct Memory {
    pub count: usize,
    /// Before the connections.
    pub idle_rss_kib: u64,
    pub rss_kib: u64,
    pub pss_kib: u64,
    /// The high-water mark of RSS over the whole run, load rounds included.
    pub peak_kib: u64,
    pub sockets: usize,
}

impl Memory {
    /// Opens `count` connections to `addr`, each after one full request and response (so the
    /// upstream connection behind it exists), then reads the memory of `pids`, summed.
    pub fn measure(addr: SocketAddr, pids: &[u32], count: usize) -> anyhow::Result<Memory> {
        let sum = |file: &str, key: &str| -> anyhow::Result<u64> {
            pids.iter()
                .map(|pid| machine::proc_kib(*pid, file, key))
                .sum()
        };
        let idle_rss_kib = sum("status", "VmRSS:")?;
        let mut streams = Vec::with_capacity(count);
        for i in 0..count {
            let mut stream =
                TcpStream::connect(addr).with_context(|| format!("connection {i} to {addr}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let response = http::exchange(&mut stream, &http::get_request(PATH))
                .with_context(|| format!("request on connection {i} to {addr}"))?;
            if response.status != Some(200) {
                bail!("connection {i} to {addr}: status {:?}", response.status);
            }
            streams.push(stream);
        }
        std::thread::sleep(Duration::from_secs(1));
        let memory = Memory {
            count,
            idle_rss_kib,
            rss_kib: sum("status", "VmRSS:")?,
            pss_kib: sum("smaps_rollup", "Pss:")?,
            peak_kib: sum("status", "VmHWM:")?,
            sockets: pids.iter().map(|pid| machine::sockets(*pid)).sum(),
        };
        drop(streams);
        Ok(memory)
    }
}
