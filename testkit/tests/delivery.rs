//! The delivery contract in process: what a push receiver is told "OK" for is queued in every
//! exporter; what it is refused reaches none; exporters send in parallel; the memory limiter
//! refuses pushes and skips scrapes.

use std::sync::Arc;
use std::time::Duration;

use genai_collector_core::config::{self, Source};
use genai_collector_core::telemetry::{ComponentStats, Telemetry};
use genai_collector_core::{ComponentKind, Service};
use genai_collector_testkit::{components, Capture};

fn service(yaml: &str, capture: &Capture) -> Service {
    let comps = components(capture);
    let cfg =
        config::load(&[Source::new("test.yaml", yaml)], &comps).unwrap_or_else(|e| panic!("{e}"));
    Service::build(cfg, &comps).unwrap_or_else(|e| panic!("{e}"))
}

fn stat(t: &Telemetry, kind: ComponentKind, id: &str) -> Arc<ComponentStats> {
    t.find(kind, id)
        .unwrap_or_else(|| panic!("no stats for {kind} {id}"))
}

/// Batches an exporter's persistent queue directory holds.
fn batch_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "batch")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_is_queued_in_every_exporter_or_in_none() {
    let capture = Capture::new();
    let dir = std::env::temp_dir().join(format!("delivery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("acked");
    // A hung backend beside a healthy one: once the hung one's queue (2 batches) is full, every
    // push is refused, and the healthy exporter gets exactly what the client was told OK for.
    let svc = service(
        &format!(
            r#"
receivers:
  generator: {{ batches: 0, points: 100, push: true, report: "{}" }}
exporters:
  capture: {{}}
  fail/hang:
    mode: hang
    timeout: 1h
    sending_queue: {{ queue_size: 2, sizer: requests }}
service:
  telemetry: {{ endpoint: null }}
  shutdown_timeout: 300ms
  pipelines:
    metrics: {{ receivers: [generator], exporters: [capture, fail/hang] }}
"#,
            report.display()
        ),
        &capture,
    );
    let telemetry = svc.telemetry().clone();
    let summary = svc
        .run(tokio::time::sleep(Duration::from_millis(500)))
        .await
        .unwrap();
    let acked: usize = std::fs::read_to_string(&report).unwrap().parse().unwrap();
    assert_eq!(acked, 200, "two batches fit the hung exporter's queue");
    assert_eq!(
        capture.point_count(),
        acked,
        "the healthy exporter got what was acknowledged, nothing more"
    );

    let recv = stat(&telemetry, ComponentKind::Receiver, "generator");
    assert_eq!(recv.snapshot().accepted, 200);
    assert!(
        recv.snapshot().refused >= 1000,
        "refusals are counted: {}",
        recv.snapshot().refused
    );
    let hung = stat(&telemetry, ComponentKind::Exporter, "fail/hang");
    assert_eq!(
        hung.snapshot().refused,
        0,
        "pushed points are refused at the receiver, not dropped at the queue"
    );
    assert_eq!(
        summary.lost_points, 200,
        "what the hung exporter held is reported lost at shutdown"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_send_in_parallel_and_deliver_everything_acknowledged() {
    let capture = Capture::new();
    let svc = service(
        r#"
receivers:
  generator: { batches: 60, points: 50, push: true }
exporters:
  capture:
    delay: 30ms
    sending_queue: { num_consumers: 4, queue_size: 8, sizer: requests }
service:
  telemetry: { endpoint: null }
  pipelines:
    metrics: { receivers: [generator], exporters: [capture] }
"#,
        &capture,
    );
    let telemetry = svc.telemetry().clone();
    let summary = svc.run(std::future::pending()).await.unwrap();
    assert!(summary.drained);
    assert_eq!(
        capture.max_in_flight(),
        4,
        "four requests in flight at once"
    );
    assert_eq!(capture.point_count(), 3000);
    let mut values = capture.values();
    values.sort_by(f64::total_cmp);
    assert!(
        values.iter().enumerate().all(|(i, v)| *v == i as f64),
        "every point exactly once, in whatever order"
    );
    let exp = stat(&telemetry, ComponentKind::Exporter, "capture");
    assert_eq!(
        (
            exp.snapshot().sent,
            exp.snapshot().queued,
            exp.snapshot().queue_bytes
        ),
        (3000, 0, 0)
    );
    let recv = stat(&telemetry, ComponentKind::Receiver, "generator");
    assert!(
        recv.snapshot().refused > 0,
        "the 8-batch queue made the client retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_held_by_the_batch_processor_is_acknowledged_when_it_is_queued() {
    let capture = Capture::new();
    // One client that sends its next request once answered: the processor has nothing more
    // to gather, so it lets each request go at once instead of waiting out its hour.
    let svc = service(
        r#"
receivers:
  generator: { batches: 3, points: 10, push: true }
processors:
  batch: { send_batch_size: 1000, timeout: 1h }
exporters:
  capture: {}
service:
  telemetry: { endpoint: null }
  pipelines:
    metrics: { receivers: [generator], processors: [batch], exporters: [capture] }
"#,
        &capture,
    );
    let telemetry = svc.telemetry().clone();
    let running = svc.start().await.unwrap();
    let recv = stat(&telemetry, ComponentKind::Receiver, "generator");
    let exp = stat(&telemetry, ComponentKind::Exporter, "capture");
    genai_collector_testkit::eventually(Duration::from_secs(10), "the pushes answered", || {
        (recv.snapshot().accepted == 30).then_some(())
    })
    .await;
    assert_eq!(exp.snapshot().accepted, 30, "answered once queued");
    running.run_until(async {}).await;
    assert_eq!(capture.point_count(), 30);
    assert_eq!(
        capture.batches().len(),
        3,
        "nothing arrived together to gather"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_that_arrive_together_are_gathered_into_one_batch() {
    let capture = Capture::new();
    // Four clients, each waiting for its answer, behind a slow processor: while it works on
    // one request the others arrive, and `batch` sends them together.
    let svc = service(
        r#"
receivers:
  generator/a: { batches: 10, points: 10, push: true }
  generator/b: { batches: 10, points: 10, push: true }
  generator/c: { batches: 10, points: 10, push: true }
  generator/d: { batches: 10, points: 10, push: true }
processors:
  noop: { sleep: 20ms }
  batch: { send_batch_size: 1000, timeout: 1h }
exporters:
  capture: {}
service:
  telemetry: { endpoint: null }
  pipelines:
    metrics:
      receivers: [generator/a, generator/b, generator/c, generator/d]
      processors: [noop, batch]
      exporters: [capture]
"#,
        &capture,
    );
    let telemetry = svc.telemetry().clone();
    let running = svc.start().await.unwrap();
    let exp = stat(&telemetry, ComponentKind::Exporter, "capture");
    genai_collector_testkit::eventually(Duration::from_secs(20), "every push answered", || {
        (exp.snapshot().accepted == 400).then_some(())
    })
    .await;
    running.run_until(async {}).await;
    assert_eq!(capture.point_count(), 400);
    let batches = capture.batches().len();
    assert!(
        batches <= 20,
        "40 pushes went out as {batches} batches: not gathered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_runs_a_pipeline_without_holding_processors_in_its_own_task() {
    let capture = Capture::new();
    let dir = std::env::temp_dir().join(format!("delivery-direct-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let name = |n: &str| format!("{n}-{}", std::process::id());
    let (direct, shared, queued) = (name("direct"), name("shared"), name("queued"));
    // Client a alone feeds a pipeline whose processors hold nothing: the push runs it in its
    // own task. Both clients feed a slow one of the same kind, where a push that finds the
    // processors busy goes through the pipeline's task. Client b feeds one with `batch`, run
    // by the pipeline's task. The collector stops while pushes are under way: every point
    // the clients were told OK for arrives in each of their pipelines.
    let svc = service(
        &format!(
            r#"
receivers:
  generator/a: {{ batches: 0, points: 10, push: true, report: "{a}" }}
  generator/b: {{ batches: 0, points: 10, push: true, report: "{b}" }}
processors:
  noop/direct: {{ name: {direct} }}
  noop/shared: {{ name: {shared}, sleep: 2ms }}
  noop/queued: {{ name: {queued} }}
  batch: {{ send_batch_size: 1000, timeout: 1h }}
exporters:
  capture: {{}}
service:
  telemetry: {{ endpoint: null }}
  shutdown_timeout: 10s
  pipelines:
    metrics/direct:
      receivers: [generator/a]
      processors: [noop/direct]
      exporters: [capture]
    metrics/shared:
      receivers: [generator/a, generator/b]
      processors: [noop/shared]
      exporters: [capture]
    metrics/queued:
      receivers: [generator/b]
      processors: [noop/queued, batch]
      exporters: [capture]
"#,
            a = dir.join("a").display(),
            b = dir.join("b").display(),
        ),
        &capture,
    );
    svc.run(tokio::time::sleep(Duration::from_millis(400)))
        .await
        .unwrap();
    let acked: usize = ["a", "b"]
        .iter()
        .map(|f| {
            std::fs::read_to_string(dir.join(f))
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    let _ = std::fs::remove_dir_all(&dir);
    let seen = genai_collector_testkit::components::noop_seen;
    let (in_push, elsewhere) = seen(&direct);
    assert!(
        in_push > 10,
        "{in_push} batches processed in the pushing task"
    );
    assert_eq!(
        elsewhere, 0,
        "uncontended, none went through the pipeline's task"
    );
    let (in_push, elsewhere) = seen(&queued);
    assert_eq!(in_push, 0, "a pipeline with `batch` runs in its own task");
    assert!(elsewhere > 10);
    let (in_push, elsewhere) = seen(&shared);
    eprintln!("shared pipeline: {in_push} batches in the pushing task, {elsewhere} in its own");
    // Each client's pushes go into two pipelines; one cut short by the shutdown may have
    // reached one of them (a batch of 10 points per client at most).
    let arrived = capture.point_count();
    assert!(
        arrived >= 2 * acked && arrived <= 2 * acked + 2 * 10,
        "{arrived} points arrived for {acked} acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_memory_limit_pushes_are_refused_and_scrapes_skipped() {
    let capture = Capture::new();
    // A hard limit of 1 MiB is below any process's resident memory: nothing gets in.
    let svc = service(
        r#"
receivers:
  generator: { batches: 0, points: 10, interval: 20ms }
  generator/push: { batches: 0, points: 10, push: true }
  vllm: { targets: ["http://127.0.0.1:9/metrics"], interval: 100ms, timeout: 90ms }
exporters:
  capture: {}
service:
  telemetry: { endpoint: null }
  memory_limiter: { limit_mib: 1, spike_limit_mib: 0, check_interval: 10ms }
  pipelines:
    metrics: { receivers: [generator, generator/push, vllm], exporters: [capture] }
"#,
        &capture,
    );
    let telemetry = svc.telemetry().clone();
    svc.run(tokio::time::sleep(Duration::from_millis(600)))
        .await
        .unwrap();
    assert_eq!(capture.point_count(), 0, "nothing got past the limiter");
    let pull = stat(&telemetry, ComponentKind::Receiver, "generator");
    let push = stat(&telemetry, ComponentKind::Receiver, "generator/push");
    let scraper = stat(&telemetry, ComponentKind::Receiver, "vllm");
    assert!(pull.snapshot().memory_refused >= 10, "dropped and counted");
    assert!(push.snapshot().memory_refused >= 10, "refused and counted");
    assert_eq!(push.snapshot().accepted, 0);
    assert!(scraper.snapshot().skipped_rounds >= 2, "scrapes skipped");
    let text = telemetry.render_prometheus();
    assert!(
        text.contains("genai_collector_memory_pressure 2")
            && text.contains("genai_collector_memory_limit_bytes{limit=\"hard\"} 1048576"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_batch_that_cannot_be_read_now_stays_on_disk() {
    let capture = Capture::new();
    let root = std::env::temp_dir().join(format!("delivery-unreadable-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = root.join("capture");
    std::fs::create_dir_all(&dir).unwrap();
    // Reading it fails, but not because it is corrupt (a directory stands in for an I/O error).
    let unreadable = dir.join(format!("{:020}-5.batch", 1));
    std::fs::create_dir(&unreadable).unwrap();
    std::fs::write(dir.join(format!("{:020}-3.batch", 2)), b"\xff\xff").unwrap();
    let svc = service(
        &format!(
            r#"
receivers:
  generator: {{ batches: 1, points: 10 }}
exporters:
  capture: {{ sending_queue: {{ storage: "{}" }} }}
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics: {{ receivers: [generator], exporters: [capture] }}
"#,
            root.display()
        ),
        &capture,
    );
    let telemetry = svc.telemetry().clone();
    svc.run(std::future::pending()).await.unwrap();
    let exp = stat(&telemetry, ComponentKind::Exporter, "capture");
    assert_eq!(capture.point_count(), 10);
    assert_eq!(
        exp.snapshot().failed,
        3,
        "the corrupt batch is dropped and counted"
    );
    assert_eq!(
        exp.snapshot().persisted,
        5,
        "the unreadable one is kept for the next start"
    );
    assert!(unreadable.exists());
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_running_out_never_delete_what_is_on_disk() {
    let capture = Capture::new();
    let root = std::env::temp_dir().join(format!("delivery-outage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let svc = service(
        &format!(
            r#"
receivers:
  generator: {{ batches: 3, points: 10 }}
exporters:
  fail:
    mode: retryable
    retry_on_failure: {{ initial_interval: 5ms, max_interval: 10ms, max_elapsed_time: 50ms }}
    sending_queue: {{ storage: "{}" }}
  fail/permanent:
    mode: permanent
    sending_queue: {{ storage: "{}" }}
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics: {{ receivers: [generator], exporters: [fail, fail/permanent] }}
"#,
            root.display(),
            root.display()
        ),
        &capture,
    );
    let telemetry = svc.telemetry().clone();
    svc.run(std::future::pending()).await.unwrap();
    let down = stat(&telemetry, ComponentKind::Exporter, "fail");
    assert_eq!((down.snapshot().failed, down.snapshot().persisted), (0, 30));
    assert_eq!(
        batch_files(&root.join("fail")),
        3,
        "a backend that is down keeps its batches on disk"
    );
    let refused = stat(&telemetry, ComponentKind::Exporter, "fail/permanent");
    assert_eq!(
        (refused.snapshot().failed, refused.snapshot().persisted),
        (30, 0)
    );
    assert_eq!(
        batch_files(&root.join("fail__permanent")),
        0,
        "data a backend refuses for good is dropped, not kept forever"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_an_outage_leaves_disk_batches_for_the_next_start_at_once() {
    let capture = Capture::new();
    let root = std::env::temp_dir().join(format!("delivery-stop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let svc = service(
        &format!(
            r#"
receivers:
  generator: {{ batches: 5, points: 10, interval: 10ms }}
exporters:
  fail:
    mode: retryable
    retry_on_failure: {{ initial_interval: 1s, max_elapsed_time: 0s }}
    sending_queue: {{ storage: "{}" }}
service:
  telemetry: {{ endpoint: null }}
  shutdown_timeout: 30s
  pipelines:
    metrics: {{ receivers: [generator], exporters: [fail] }}
"#,
            root.display()
        ),
        &capture,
    );
    let telemetry = svc.telemetry().clone();
    let running = svc.start().await.unwrap();
    let recv = stat(&telemetry, ComponentKind::Receiver, "generator");
    genai_collector_testkit::eventually(Duration::from_secs(10), "all five batches queued", || {
        (recv.snapshot().accepted == 50).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    let summary = running.run_until(async {}).await;
    assert!(summary.drained, "{summary:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "retries of batches on disk end with the shutdown, not with shutdown_timeout: {:?}",
        started.elapsed()
    );
    let down = stat(&telemetry, ComponentKind::Exporter, "fail");
    assert_eq!((down.snapshot().failed, down.snapshot().persisted), (0, 50));
    assert_eq!(batch_files(&root.join("fail")), 5);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_persistent_queue_stops_at_storage_limit_and_counts_what_stays_in_memory() {
    let capture = Capture::new();
    let root = std::env::temp_dir().join(format!("delivery-limit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let svc = service(
        &format!(
            r#"
receivers:
  generator: {{ batches: 20, points: 5000 }}
exporters:
  fail:
    mode: retryable
    retry_on_failure: {{ initial_interval: 5ms, max_interval: 10ms, max_elapsed_time: 50ms }}
    sending_queue: {{ storage: "{}", storage_limit: 1MiB, queue_size: 256MiB }}
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics: {{ receivers: [generator], exporters: [fail] }}
"#,
            root.display()
        ),
        &capture,
    );
    let telemetry = svc.telemetry().clone();
    svc.run(std::future::pending()).await.unwrap();
    let down = stat(&telemetry, ComponentKind::Exporter, "fail");
    let on_disk: u64 = std::fs::read_dir(root.join("fail"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".batch"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let (persisted, skipped, failed) = (
        down.snapshot().persisted,
        down.snapshot().disk_skipped,
        down.snapshot().failed,
    );
    eprintln!("{on_disk} bytes on disk; points kept {persisted}, memory only {skipped}");
    assert!(on_disk <= 1 << 20, "{on_disk} bytes on disk");
    assert_eq!(down.snapshot().disk_bytes, on_disk);
    assert!(persisted > 0 && skipped > 0);
    assert_eq!(
        persisted + skipped,
        100_000,
        "every point is on disk or counted"
    );
    assert_eq!(
        failed, skipped,
        "what was in memory only is lost with the outage"
    );
    let _ = std::fs::remove_dir_all(&root);
}
