//! The custom receiver's samples reach an exporter through the real runtime.

use std::time::Duration;

use custom_receiver::TextfileReceiverFactory;
use genai_collector_core::config::{self, Source};
use genai_collector_core::model::{metric, number_value};
use genai_collector_core::Service;
use genai_collector_testkit::{components, Capture};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn textfile_gauges_reach_the_exporter() {
    let dir = std::env::temp_dir().join(format!("textfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gauges.txt");
    std::fs::write(
        &file,
        "# queue depth per model\nqueue_depth 3\nkv_cache_ratio 0.42\nnot a number\n",
    )
    .unwrap();

    let capture = Capture::new();
    let comps = components(&capture).with_receiver(TextfileReceiverFactory);
    let yaml = format!(
        "receivers:\n  textfile: {{ path: \"{}\", interval: 50ms }}\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [textfile], exporters: [capture] }}\n",
        file.display()
    );
    let cfg = config::load(&[Source::new("t.yaml", yaml)], &comps).unwrap();
    let service = Service::build(cfg, &comps).unwrap();
    service
        .run(tokio::time::sleep(Duration::from_millis(120)))
        .await
        .unwrap();

    let batches = capture.batches();
    assert!(
        batches.len() >= 2,
        "read on every tick, got {}",
        batches.len()
    );
    let values: Vec<(String, f64)> = batches[0]
        .metrics()
        .map(|m| {
            let Some(metric::Data::Gauge(g)) = &m.data else {
                panic!("gauge expected")
            };
            (m.name.clone(), number_value(&g.data_points[0]).unwrap())
        })
        .collect();
    assert_eq!(
        values,
        vec![("queue_depth".into(), 3.0), ("kv_cache_ratio".into(), 0.42)]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_typos_are_located() {
    let comps = components(&Capture::new()).with_receiver(TextfileReceiverFactory);
    let yaml = "receivers:\n  textfile:\n    path: /x\n    intervall: 5s\nexporters:\n  debug: {}\nservice:\n  pipelines:\n    metrics: { receivers: [textfile], exporters: [debug] }\n";
    let Err(e) = config::load(&[Source::new("t.yaml", yaml)], &comps) else {
        panic!("accepted a typo")
    };
    assert_eq!((e.line, e.column), (4, 5));
    assert!(e.message.contains("unknown field `intervall`"), "{e}");
}
