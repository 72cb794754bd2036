//! `service.worker_threads` sets the async runtime's worker threads.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Threads of `pid` named as tokio names its workers.
fn workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim() == "tokio-rt-worker")
                .count()
        })
        .unwrap_or(0)
}

fn run_with(threads: usize) -> usize {
    let dir = std::env::temp_dir().join(format!("runtime-{}-{threads}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "receivers:\n  internal: {{ interval: 1h }}\nexporters:\n  debug: {{ verbosity: basic }}\nservice:\n  telemetry: {{ endpoint: null }}\n  worker_threads: {threads}\n  pipelines:\n    metrics: {{ receivers: [internal], exporters: [debug] }}\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_genai-collector"))
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Tokio starts its workers with the runtime; give the process a moment to get there.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    while Instant::now() < deadline {
        seen = workers(child.id());
        if seen > 0 {
            std::thread::sleep(Duration::from_millis(200));
            seen = workers(child.id());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    seen
}

#[test]
fn worker_threads_sets_the_runtimes_workers() {
    assert_eq!(run_with(1), 1);
    assert_eq!(run_with(3), 3);
}
