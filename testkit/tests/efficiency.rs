//! `efficiency` end to end: the collector binary reads the stand-in NVML driver
//! (tests/peers/fake-nvml), whose GPU 0 runs the engine simulator's process, and scrapes that
//! simulator, a child process listening on a real port. The processor must find GPU 0 (and not
//! GPU 1) through the listening socket and NVML's process list, and its joules and joules per
//! token must equal what the counters in the same output give by hand; with another process on
//! GPU 0, its share by the driver's per-process SM utilisation.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use genai_collector_testkit::{fake_nvml, free_port};

/// One line of the `debug` exporter at `detailed`: time, name, point attributes, value.
struct Line {
    time: String,
    name: String,
    attrs: String,
    value: f64,
    resource: String,
}

fn parse(line: &str) -> Option<Line> {
    let (time, rest) = line.split_once(' ')?;
    let (_kind, rest) = rest.split_once(' ')?;
    let name_end = rest.find(['{', ' '])?;
    let name = &rest[..name_end];
    let (attrs, rest) = match rest[name_end..].strip_prefix('{') {
        Some(r) => r.split_once("} ")?,
        None => ("", &rest[name_end + 1..]),
    };
    let (value, resource) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(Line {
        time: time.to_owned(),
        name: name.to_owned(),
        attrs: attrs.to_owned(),
        value: value.parse().ok()?,
        resource: resource.to_owned(),
    })
}

/// One engine batch in the output: its time, the GPUs' latest energy readings before it, and
/// its values by name (tokens as `input` and `output`).
struct EngineBatch {
    time: String,
    gpu_energy: HashMap<String, f64>,
    figures: HashMap<String, f64>,
}

#[test]
fn a_local_engine_is_joined_to_its_gpu_and_its_joules_per_token_match_the_counters() {
    engine_on_gpu0(None);
}

/// GPU 0 also runs a stranger's process at a third of the engine's SM utilisation: the engine
/// gets three quarters of its joules and GPU-seconds.
#[test]
fn a_gpu_shared_with_another_process_is_split_by_the_drivers_per_process_utilisation() {
    let mut stranger = Command::new("sleep").arg("60").spawn().unwrap();
    engine_on_gpu0(Some(stranger.id()));
    let _ = stranger.kill();
    let _ = stranger.wait();
}

/// The engine simulator on GPU 0 (with `stranger` beside it at 10 % SM against its 30 %), the
/// collector binary on the stand-in driver, and the figures checked against the counters.
fn engine_on_gpu0(stranger: Option<u32>) {
    let share = if stranger.is_some() { 0.75 } else { 1.0 };
    let dir = std::env::temp_dir().join(format!(
        "genai-efficiency-{}-{}",
        std::process::id(),
        stranger.is_some()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    if fake_nvml(&dir).is_none() {
        eprintln!("no C compiler (cc): skipped; CI installs one");
        return;
    }
    let port = free_port();
    let mut sim = Command::new(env!("CARGO_BIN_EXE_engine-sim"))
        .args(["--engine", "vllm-v1", "--base-port", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // It prints its URL once it listens.
    let mut url = String::new();
    BufReader::new(sim.stdout.take().unwrap())
        .read_line(&mut url)
        .unwrap();
    let sim = common::Killed(sim);
    let config = dir.join("collector.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
receivers:
  nvml: {{ interval: 300ms, required: true }}
  vllm: {{ targets: ["{}"], interval: 400ms }}
processors:
  genai_normalize: {{}}
  efficiency: {{ interval: 1s, prices: [{{ match: {{ hw.model: "NVIDIA H100 80GB HBM3" }}, price_per_gpu_hour: 3.6 }}] }}
exporters:
  debug: {{ verbosity: detailed, sending_queue: {{ num_consumers: 1 }} }}
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics: {{ receivers: [nvml, vllm], processors: [genai_normalize, efficiency], exporters: [debug] }}
"#,
            url.trim()
        ),
    )
    .unwrap();
    let mut collector = Command::new(env!("CARGO_BIN_EXE_testkit-collector"))
        .arg("-c")
        .arg(&config)
        .env("LD_LIBRARY_PATH", &dir)
        .env("FAKE_NVML_GPUS", "2")
        .env(
            "FAKE_NVML_PROCS",
            match stranger {
                Some(other) => format!("0:{}:1073741824,0:{other}:1048576", sim.0.id()),
                None => format!("0:{}:1073741824", sim.0.id()),
            },
        )
        .env(
            "FAKE_NVML_PROC_SM",
            format!("{}:30,{}:10", sim.0.id(), stranger.unwrap_or(0)),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = collector.stdout.take().unwrap();
    let _collector = common::Killed(collector);
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });

    // Walk the output in order: the GPUs' latest energy readings, and per engine batch (its
    // points share the scrape's time) its tokens and the processor's figures.
    let gpu0 = "GPU-fa4e0000-0000-4000-8000-000000000000";
    let windows = |lines: &[String]| {
        let mut energy: HashMap<String, f64> = HashMap::new();
        let mut batches: Vec<EngineBatch> = Vec::new();
        for l in lines.iter().filter_map(|l| parse(l)) {
            if l.name == "hw.energy" {
                let id = l.attrs.split('"').nth(1).unwrap_or("").to_owned();
                energy.insert(id, l.value);
                continue;
            }
            if !l.resource.contains(&format!("127.0.0.1:{port}")) {
                continue;
            }
            if batches.last().is_none_or(|b| b.time != l.time) {
                batches.push(EngineBatch {
                    time: l.time.clone(),
                    gpu_energy: energy.clone(),
                    figures: HashMap::new(),
                });
            }
            let figures = &mut batches.last_mut().unwrap().figures;
            let key = match l.name.as_str() {
                "gen_ai.server.token.usage" => {
                    if l.attrs.contains("gen_ai.token.type=\"output\"") {
                        "output"
                    } else {
                        "input"
                    }
                }
                other => other,
            };
            *figures.entry(key.to_owned()).or_default() += l.value;
        }
        batches
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let batches = loop {
        let b = windows(&lines.lock().unwrap());
        let evaluated = b
            .windows(2)
            .filter(|w| {
                w[1].figures.get("gen_ai.server.energy") > w[0].figures.get("gen_ai.server.energy")
            })
            .count();
        if evaluated >= 3 {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than 3 efficiency windows in 60 s:\n{}",
            lines.lock().unwrap().join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    // From the first batch with figures (the baseline) to each where the energy counter moved.
    let start = batches
        .iter()
        .position(|b| b.figures.contains_key("gen_ai.server.energy"))
        .unwrap();
    let mut base = &batches[start];
    let mut checked = 0;
    for b in &batches[start + 1..] {
        let moved = b.figures["gen_ai.server.energy"] - base.figures["gen_ai.server.energy"];
        if moved == 0.0 {
            continue;
        }
        let joules = (b.gpu_energy[gpu0] - base.gpu_energy[gpu0]) * share;
        let tokens = (b.figures["input"] + b.figures["output"])
            - (base.figures["input"] + base.figures["output"]);
        let output = b.figures["output"] - base.figures["output"];
        assert!(
            (moved - joules).abs() <= 1e-6 * joules,
            "the engine's joules are its share ({share}) of GPU 0's: {moved} vs {joules}"
        );
        assert!(tokens > 0.0, "the simulator's counters move");
        let per_token = b.figures["gen_ai.server.energy.per_token"];
        assert!(
            (per_token - joules / tokens).abs() <= 1e-9 * per_token.abs().max(1.0),
            "{per_token} J/token vs {joules} J / {tokens} tokens"
        );
        let per_output = b.figures["gen_ai.server.energy.per_output_token"];
        assert!((per_output - joules / output).abs() <= 1e-9 * per_output.max(1.0));
        base = b;
        checked += 1;
    }
    assert!(checked >= 3);
    // 3.6 per GPU-hour is 0.001 per GPU-second of the engine's share of one GPU.
    let last = &batches.last().unwrap().figures;
    let (cost, seconds) = (last["gen_ai.server.cost"], last["gen_ai.server.gpu.time"]);
    assert!(
        seconds > 0.0 && (cost - seconds * 0.001).abs() < 1e-9,
        "{cost} for {seconds} s"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
