//! Replays every file of the committed fuzz corpora (`fuzz/corpus/<target>/`) through its
//! target on stable, so that CI guards every input the fuzzer ever kept, findings included.
//! `GENAI_FUZZ_SEED=1 cargo test -p genai-collector-testkit --test fuzz_corpora` writes the seed
//! inputs (the fixtures' engine pages, encoded OTLP requests, configs) before a fuzzing run.

use std::path::{Path, PathBuf};

use genai_collector_testkit::fuzz::TARGETS;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

#[test]
fn every_corpus_file_replays_without_a_panic() {
    // The binary parses its config on an 8 MiB main thread with optimised frames; a test
    // thread has 2 MiB of unoptimised ones, too few for the YAML parser's deepest inputs.
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(replay)
        .unwrap()
        .join()
        .unwrap();
}

fn replay() {
    if std::env::var_os("GENAI_FUZZ_SEED").is_some() {
        seed();
    }
    let mut total = 0;
    for (target, run) in TARGETS {
        let dir = corpus(target);
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(
            !files.is_empty(),
            "{target}: an empty corpus guards nothing"
        );
        for f in &files {
            let data = std::fs::read(f).unwrap();
            let result = std::panic::catch_unwind(|| run(&data));
            assert!(result.is_ok(), "{target}: {} panics", f.display());
        }
        println!("{target}: {} inputs", files.len());
        total += files.len();
    }
    println!("{total} corpus inputs replayed");
}

/// Writes the seed inputs each target starts from.
fn seed() {
    use genai_collector_core::model::{kv, number_point, Batch, Metric, MetricExt};
    use prost::Message as _;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let write = |target: &str, name: &str, data: &[u8]| {
        std::fs::create_dir_all(corpus(target)).unwrap();
        std::fs::write(corpus(target).join(name), data).unwrap();
    };
    let files = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let fixtures = root.join("tests/fixtures");
    for engine in ["vllm", "tgi", "llamacpp"] {
        for f in files(&fixtures.join(engine)) {
            if f.extension().is_some_and(|e| e == "prom" || e == "txt") {
                let name = f.file_name().unwrap().to_string_lossy().into_owned();
                write(
                    "scrape_page",
                    &format!("{engine}-{name}"),
                    &std::fs::read(&f).unwrap(),
                );
            }
        }
    }
    for f in files(&fixtures.join("openmetrics-parsers")) {
        let input = f.join("metrics");
        if let Ok(data) = std::fs::read(&input) {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            write("scrape_page", &format!("om-{name}"), &data);
        }
    }
    for f in files(&fixtures.join("ollama")) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        write("ollama_ps", &name, &std::fs::read(&f).unwrap());
    }
    for f in files(&root.join("tests/configs/good"))
        .into_iter()
        .chain(files(&root.join("tests/configs/bad")))
        .chain([root.join("config.example.yaml")])
    {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        write("config", &name, &std::fs::read(&f).unwrap());
    }
    let batch = {
        let mut b = Batch::with_resource(
            vec![kv("service.name", "vllm"), kv("gen_ai.pool.name", "chat")],
            vec![
                Metric::gauge(
                    "vllm:num_requests_running",
                    "",
                    vec![number_point(1, 3.0, vec![kv("model_name", "m")])],
                ),
                Metric::gauge(
                    "vllm:kv_cache_usage_perc",
                    "",
                    vec![number_point(1, 0.4, vec![])],
                ),
                Metric::sum(
                    "vllm:prompt_tokens_total",
                    "",
                    true,
                    vec![number_point(1, 9.0, vec![kv("model_name", "m")])],
                ),
            ],
        );
        b.push_resource(
            vec![kv("service.name", "app")],
            vec![Metric::gauge("g", "1", vec![])],
        );
        b
    };
    write("otlp_pipeline", "vllm.pb", &batch.encode_request());
    let json = serde_json::to_vec(&batch.clone().into_request()).unwrap();
    write("otlp_pipeline", "vllm.json", &json);
    // otlp_http: a flags byte (content type, encoding, token), then the body.
    for (name, flags, body) in [
        ("protobuf", 0u8, batch.encode_request()),
        ("json", 1, json.clone()),
        ("gzip", 4, batch.encode_request()),
        ("claims-gzip", 8, batch.encode_request()),
        ("wrong-token", 0x20, batch.encode_request()),
    ] {
        write("otlp_http", name, &[&[flags][..], &body].concat());
    }
    // disk_queue: (name length, name, content length as 2 bytes LE, content) entries.
    let entry = |name: &str, content: &[u8]| {
        let len = (content.len() as u16).to_le_bytes();
        [&[name.len() as u8][..], name.as_bytes(), &len, content].concat()
    };
    let dir = std::env::temp_dir().join(format!("fuzz-seed-{}", std::process::id()));
    let (q, _) =
        genai_collector_core::disk_queue::DiskQueue::open(&dir, "s", false, 1 << 30).unwrap();
    let seq = q.write(&batch).unwrap();
    let name = format!("{seq:020}-{}.batch", batch.point_count());
    let file = std::fs::read(q.dir().join(&name)).unwrap();
    drop(q);
    let _ = std::fs::remove_dir_all(&dir);
    write("disk_queue", "one-batch", &entry(&name, &file));
    write(
        "disk_queue",
        "mixed",
        &[
            entry(&name, &file),
            entry("00000000000000000002-9.batch", &file),
            entry("00000000000000000003.tmp", b"half"),
            entry("notes.txt", b"not ours"),
        ]
        .concat(),
    );
    write(
        "retry_hint",
        "one-second",
        &genai_collector_core::retry_info::encode(8, "busy", std::time::Duration::from_secs(1)),
    );
    use genai_collector_receivers::nvml::pod_resources::{
        ContainerDevices, ContainerResources, ListPodResourcesResponse, PodResources,
    };
    let list = ListPodResourcesResponse {
        pod_resources: vec![PodResources {
            name: "vllm-0".into(),
            namespace: "inference".into(),
            containers: vec![ContainerResources {
                name: "vllm".into(),
                devices: vec![ContainerDevices {
                    resource_name: "nvidia.com/gpu".into(),
                    device_ids: vec!["GPU-aaaa".into(), "GPU-bbbb::1".into()],
                }],
            }],
        }],
    };
    write("pod_resources", "one-pod", &list.encode_to_vec());
}
