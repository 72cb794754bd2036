//! The collector binary's real NVML path (the test build, `testkit-collector`, shares it) (dlopen of `libnvidia-ml.so.1`, symbol lookup, struct
//! layouts) against the stand-in driver in tests/peers/fake-nvml, built here with `cc`: the
//! hardware conventions' names reach the Prometheus endpoint, the energy counter moves as the
//! integral of the power the driver reports, a GPU whose row remapper waits for a reset is
//! `degraded` in `hw.status`, and a critical XID error the driver reports as an event is counted
//! and degrades its GPU.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use genai_collector_testkit::free_port;

fn get(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body.split_once("\r\n\r\n")?.1.to_owned())
}

/// `name{labels} value` lines of one metric, by their labels.
fn samples(page: &str, name: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            Some((labels.to_owned(), value.split(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The value of the one sample of `name` whose labels contain every `want`.
fn value(page: &str, name: &str, want: &[&str]) -> f64 {
    let found: Vec<f64> = samples(page, name)
        .into_iter()
        .filter(|(labels, _)| want.iter().all(|w| labels.contains(w)))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(found.len(), 1, "{name} {want:?}:\n{page}");
    found[0]
}

#[test]
fn the_binary_reads_a_driver_through_nvml() {
    let dir = std::env::temp_dir().join(format!("genai-nvml-driver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    if genai_collector_testkit::fake_nvml(&dir).is_none() {
        eprintln!("no C compiler (cc): skipped; CI installs one");
        return;
    }
    let port = free_port();
    let config = dir.join("collector.yaml");
    std::fs::write(
        &config,
        format!(
            "receivers:\n  nvml: {{ interval: 200ms, required: true }}\nexporters:\n  prometheus: {{ endpoint: \"127.0.0.1:{port}\" }}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [nvml], exporters: [prometheus] }}\n"
        ),
    )
    .unwrap();
    let _collector = common::Killed(
        Command::new(env!("CARGO_BIN_EXE_testkit-collector"))
            .arg("-c")
            .arg(&config)
            .env("LD_LIBRARY_PATH", &dir)
            .env("FAKE_NVML_GPUS", "2")
            .env("FAKE_NVML_ROW_REMAP", "1:pending")
            // XID 79 on GPU 0, after the first readings went out healthy.
            .env("FAKE_NVML_XID", "0:79@2.5")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let scrape = |after: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(page) = get(port).filter(|p| after(p)) {
                return page;
            }
            assert!(Instant::now() < deadline, "no GPU readings from the binary");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let first = scrape(&|p| p.contains("hw_energy_joules_total{"));
    let energy = |page: &str| {
        let g0 = r#"hw_id="GPU-fa4e0000-0000-4000-8000-000000000000""#;
        (
            value(page, "hw_energy_joules_total", &[g0, r#"hw_type="gpu""#]),
            value(page, "hw_power_watts", &[g0, r#"hw_type="gpu""#]),
        )
    };
    let (e0, _) = energy(&first);
    let started = Instant::now();
    let later = scrape(&|p| energy(p).0 > e0 + 500.0);
    let (e1, watts) = energy(&later);
    let seconds = started.elapsed().as_secs_f64();

    // The stand-in's power swings between 70 and 700 W; the energy counter is its integral, so
    // joules over the wall time between the two scrapes fall in that band (the polls make the
    // window up to two intervals wider or narrower).
    let mean_watts = (e1 - e0) / seconds;
    assert!(
        (70.0 * 0.5..=700.0 * 1.5).contains(&mean_watts),
        "{e0} J then {e1} J over {seconds:.2} s: {mean_watts:.0} W"
    );
    assert!((70.0..=700.0).contains(&watts), "{watts} W");

    // Two GPUs; each series names its GPU, and the generic `hw.*` ones `hw.type`.
    for (name, label) in [
        ("hw_gpu_utilization_ratio", "hw_gpu_task="),
        ("hw_gpu_memory_utilization_ratio", "hw_id="),
        ("hw_gpu_memory_usage_bytes", "hw_id="),
        ("hw_temperature_celsius", r#"hw_type="gpu""#),
        ("hw_errors_total", r#"hw_type="gpu""#),
    ] {
        let found = samples(&later, name);
        assert!(found.len() >= 2, "{name}:\n{later}");
        for l in found.keys() {
            assert!(l.contains(label) && l.contains("hw_id="), "{name}{{{l}}}");
        }
    }
    let decoder = value(
        &later,
        "hw_gpu_utilization_ratio",
        &["000000000001", r#"hw_gpu_task="decoder""#],
    );
    assert_eq!(decoder, 0.07);
    assert_eq!(
        value(
            &later,
            "hw_errors_total",
            &["000000000000", r#"error_type="corrected""#]
        ),
        3.0
    );
    // GPU 1's row remap waits for a reset; GPU 0 is healthy.
    let state = |gpu: &str, s: &str| {
        value(
            &later,
            "hw_status",
            &[gpu, &format!(r#"hw_state="{s}""#), r#"hw_type="gpu""#],
        )
    };
    assert_eq!(state("000000000001", "ok"), 0.0);
    assert_eq!(state("000000000001", "degraded"), 1.0);
    assert_eq!(state("000000000001", "failed"), 0.0);
    // GPU 0 was ok before its XID, and degraded once the event came.
    assert!(!first.contains("hw_gpu_xid_errors"), "no XID yet:\n{first}");
    let xid = scrape(&|p| p.contains("hw_gpu_xid_errors_total{"));
    assert_eq!(
        value(
            &xid,
            "hw_gpu_xid_errors_total",
            &["000000000000", r#"hw_gpu_xid="79""#]
        ),
        1.0
    );
    let g0 = |page: &str, s: &str| {
        value(
            page,
            "hw_status",
            &["000000000000", &format!(r#"hw_state="{s}""#)],
        )
    };
    assert_eq!(g0(&first, "ok"), 1.0);
    assert_eq!(g0(&xid, "ok"), 0.0);
    assert_eq!(g0(&xid, "degraded"), 1.0);
    assert!(
        !later.contains("hw_gpu_power_draw") && !later.contains("hw_gpu_energy_consumed"),
        "the OpenLIT names only on request"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
