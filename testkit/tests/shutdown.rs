//! SIGTERM with batches in flight: the binary drains them to the exporter before it exits.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("genai-shutdown-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn points_in_flight_at_sigterm_reach_the_exporter() {
    let d = dir("drain");
    let config = d.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
receivers:
  generator: {{ batches: 0, points: 50, interval: 2ms, report: "{sent}" }}
exporters:
  file:
    path: "{out}"
    delay: 10ms
    # One request at a time: a backlog builds up, and it is written in order.
    sending_queue: {{ num_consumers: 1 }}
service:
  telemetry: {{ endpoint: null }}
  shutdown_timeout: 60s
  pipelines:
    metrics: {{ receivers: [generator], exporters: [file] }}
"#,
            sent = d.join("sent").display(),
            out = d.join("out").display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_testkit-collector"))
        .args(["run", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let written_before = std::fs::read_to_string(d.join("out"))
        .unwrap_or_default()
        .lines()
        .count();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    assert!(stderr.contains("shutdown requested"), "{stderr}");

    let sent: usize = std::fs::read_to_string(d.join("sent"))
        .unwrap()
        .parse()
        .unwrap();
    let values: Vec<u64> = std::fs::read_to_string(d.join("out"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(
        sent > written_before + 500,
        "batches were in flight at SIGTERM: sent {sent}, written {written_before}"
    );
    assert_eq!(
        values.len(),
        sent,
        "every accepted point reached the exporter"
    );
    assert!(
        values.iter().enumerate().all(|(i, v)| *v == i as u64),
        "in order, none lost or doubled"
    );
    eprintln!(
        "drained {} points in {:?}",
        sent - written_before,
        started.elapsed()
    );
    let _ = std::fs::remove_dir_all(&d);
}
