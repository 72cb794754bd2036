//! An exporter that encodes (`Exporter::encode`): the runtime encodes each batch once, frees it
//! before the first attempt, and every retry sends the same bytes through `export_encoded`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

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
