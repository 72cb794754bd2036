//! An exporter that encodes (`Exporter::encode`): the runtime encodes each batch once as it is
//! queued, frees it then, queues the request (counted by its length), and every retry sends the
//! same bytes through `export_encoded`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use genai_collector_core::component::ComponentKind;
use genai_collector_core::config::ExporterSettings;
use genai_collector_core::model::{number_point, Metric, MetricExt};
use genai_collector_core::runtime::QueuedExporter;
use genai_collector_core::telemetry::Telemetry;
use genai_collector_core::{async_trait, Batch, Bytes, ExportError, Exporter};

#[derive(Default)]
struct Seen {
    encodes: AtomicUsize,
    exports: AtomicUsize,
    bodies: Mutex<Vec<Bytes>>,
    /// The batch as committed; gone by the first attempt.
    batch: Mutex<Option<Weak<Batch>>>,
    alive_at_first_attempt: Mutex<Option<bool>>,
}

struct Encoding(Arc<Seen>);

#[async_trait]
impl Exporter for Encoding {
    async fn export(&self, _: &Batch) -> Result<(), ExportError> {
        self.0.exports.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn encode(&self, batch: &Batch) -> Option<Bytes> {
        self.0.encodes.fetch_add(1, Ordering::SeqCst);
        Some(Bytes::from(batch.encode_request()))
    }

    async fn export_encoded(&self, request: Bytes) -> Result<(), ExportError> {
        let mut bodies = self.0.bodies.lock().unwrap();
        if bodies.is_empty() {
            let alive = self
                .0
                .batch
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|w| w.upgrade().is_some());
            *self.0.alive_at_first_attempt.lock().unwrap() = Some(alive);
        }
        bodies.push(request);
        if bodies.len() < 3 {
            return Err(ExportError::retryable("unavailable (test)"));
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_batch_is_encoded_once_freed_and_its_bytes_sent_on_every_attempt() {
    let seen = Arc::new(Seen::default());
    let mut settings = ExporterSettings::default();
    settings.retry_on_failure.initial_interval = Duration::from_millis(5);
    settings.retry_on_failure.max_interval = Duration::from_millis(10);
    let telemetry = Telemetry::new();
    let exporter = QueuedExporter::start(
        "encoding",
        Box::new(Encoding(seen.clone())),
        &settings,
        &telemetry,
    )
    .unwrap();
    let batch = Arc::new(Batch::with_resource(
        vec![],
        vec![Metric::gauge(
            "g",
            "",
            (0..10).map(|i| number_point(1, i as f64, vec![])).collect(),
        )],
    ));
    let want = batch.encode_request();
    *seen.batch.lock().unwrap() = Some(Arc::downgrade(&batch));
    let room = exporter.reserve(&batch).await.unwrap();
    room.commit(batch).await;
    exporter.stop().await;

    assert_eq!(seen.encodes.load(Ordering::SeqCst), 1, "encoded once");
    assert_eq!(
        seen.exports.load(Ordering::SeqCst),
        0,
        "never sent as a batch"
    );
    let bodies = seen.bodies.lock().unwrap();
    assert_eq!(bodies.len(), 3, "two retries, then sent");
    assert!(
        bodies.iter().all(|b| b[..] == want[..]),
        "the same bytes each time"
    );
    assert_eq!(
        *seen.alive_at_first_attempt.lock().unwrap(),
        Some(false),
        "the batch was freed before the first attempt"
    );
}

/// Holds every attempt until the gate opens.
struct Gated {
    gate: Arc<tokio::sync::Semaphore>,
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

#[async_trait]
impl Exporter for Gated {
    async fn export(&self, _: &Batch) -> Result<(), ExportError> {
        Err(ExportError::Permanent("sent as a batch".into()))
    }

    fn encode(&self, batch: &Batch) -> Option<Bytes> {
        Some(Bytes::from(batch.encode_request()))
    }

    async fn export_encoded(&self, request: Bytes) -> Result<(), ExportError> {
        let _pass = self.gate.acquire().await;
        self.bodies.lock().unwrap().push(request);
        Ok(())
    }
}

fn gauge(points: usize) -> Arc<Batch> {
    Arc::new(Batch::with_resource(
        vec![],
        vec![Metric::gauge(
            "g",
            "",
            (0..points)
                .map(|i| number_point(1, i as f64, vec![]))
                .collect(),
        )],
    ))
}

#[tokio::test]
async fn a_queued_batch_is_held_as_its_request_and_counted_by_its_length() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let mut settings = ExporterSettings::default();
    settings.sending_queue.num_consumers = 1;
    let telemetry = Telemetry::new();
    let exporter = QueuedExporter::start(
        "gated",
        Box::new(Gated {
            gate: gate.clone(),
            bodies: bodies.clone(),
        }),
        &settings,
        &telemetry,
    )
    .unwrap();
    let stats = telemetry
        .find(ComponentKind::Exporter, "gated")
        .expect("the exporter's stats");
    // The first batch holds the only consumer at the gate; the second waits in the queue.
    let (first, second) = (gauge(100), gauge(1000));
    let mut wire = 0;
    for batch in [first, second] {
        wire += batch.encode_request().len() as u64;
        let estimate = genai_collector_core::model::approx_bytes(&batch);
        assert!(estimate > 4 * batch.encode_request().len() as u64);
        let freed = Arc::downgrade(&batch);
        let room = exporter.reserve(&batch).await.unwrap();
        room.commit(batch).await;
        assert!(freed.upgrade().is_none(), "freed as it was queued");
    }
    let counts = stats.snapshot();
    assert_eq!(counts.queued, 1100);
    assert_eq!(
        counts.queue_bytes, wire,
        "the requests' lengths, not the batches' estimate"
    );
    assert_eq!(
        counts.queue_used, wire,
        "the bytes sizer counts what the queue holds"
    );
    gate.add_permits(2);
    exporter.stop().await;
    let counts = stats.snapshot();
    assert_eq!(
        (counts.queue_bytes, counts.queue_used, counts.sent),
        (0, 0, 1100)
    );
    assert_eq!(bodies.lock().unwrap().len(), 2);
}
