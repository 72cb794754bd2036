//! Test components for genai-collector's own tests and benchmarks (dev only).
//!
//! `generator` makes numbered points as fast as asked; `capture` keeps what reaches it; `fail`
//! refuses everything; `file` writes each point's value to a file, slowly if asked; `noop`
//! passes batches through. [`components()`] registers them beside the built-in kinds. [`sim`]
//! serves the engines' pages from `tests/fixtures` with moving values and faults on demand.

pub mod components;
pub mod fuzz;
pub mod sim;

pub use components::{components, Capture};

/// Waits for a condition instead of a clock: `check` every 20 ms until it gives `Some`, for at
/// most `within` (generous: a loaded 2-core CI machine is slow, and a met condition returns at
/// once); past it, panics naming `what`.
pub async fn eventually<T>(
    within: std::time::Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    eventually_async(within, what, || std::future::ready(check())).await
}

/// [`eventually`] for a check that awaits (an HTTP request).
pub async fn eventually_async<T, F: std::future::Future<Output = Option<T>>>(
    within: std::time::Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The Python with the test peers' packages (tests/peers/requirements.txt): `GENAI_PEERS_PYTHON`,
/// else the repository's `.venv`, which `scripts/test` makes.
pub fn peers_python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("GENAI_PEERS_PYTHON") {
        return p.into();
    }
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "the Python peers need tests/peers/requirements.txt: run `scripts/test`"
    );
    venv
}

/// A loopback port free now, for a server a test or harness starts next.
/// Builds the stand-in NVML driver (tests/peers/fake-nvml) into `dir` as `libnvidia-ml.so.1`,
/// for a collector started with `LD_LIBRARY_PATH=dir`; `None` where no C compiler is installed.
pub fn fake_nvml(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/peers/fake-nvml/fake_nvml.c");
    let lib = dir.join("libnvidia-ml.so.1");
    let status = std::process::Command::new("cc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&source)
        .arg("-lm")
        .status()
        .ok()?;
    assert!(status.success(), "cc failed on {}", source.display());
    Some(lib)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A `/proc/<pid>/status` field in kB (`VmRSS:`, `VmHWM:`); 0 when it cannot be read.
pub fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
