//! The persistent exporter queue (`sending_queue.storage`).
//!
//! Each batch an exporter accepts is written to a file of its own before it enters the
//! in-memory queue, and the file is removed once the batch is delivered or given up on; at start
//! the files left behind are delivered first, oldest first. Delivery is at-least-once: a batch
//! sent just before a kill is sent again. A file is written under a temporary name and renamed,
//! so a kill mid-write leaves a `.tmp` the next start removes, never half a batch. A killed
//! process loses nothing the kernel holds. With `fsync`, each file and then the directory are
//! flushed before the batch counts as queued, so a power cut loses nothing acknowledged; without
//! it, a power cut may lose the last batches, and a file it left empty or short is detected by
//! its point count and dropped as corrupt, never counted as sent.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message as _;

use crate::model::Batch;

/// One exporter's directory of queued batches, `<storage>/<exporter id>/`.
#[derive(Debug)]
pub struct DiskQueue {
    dir: PathBuf,
    next: AtomicU64,
    /// Flush each file and the directory to the disk before the batch counts as queued.
    fsync: bool,
    /// Held open with an exclusive lock for as long as the queue lives.
    _lock: fs::File,
}

/// A batch on disk: its sequence number, size and when it was queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub points: u64,
    /// Unix milliseconds.
    pub queued_at_ms: u64,
}

impl DiskQueue {
    /// Opens (creating) the directory for `exporter` under `root`, removes what an interrupted
    /// write left, and returns the batches waiting there, oldest first.
    pub fn open(root: &Path, exporter: &str, fsync: bool) -> io::Result<(Self, Vec<Stored>)> {
        let dir = root.join(exporter.replace('/', "__"));
        fs::create_dir_all(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        // Two writers would take each other's sequence numbers and delete each other's files.
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))?;
        if let Err(e) = lock.try_lock() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} is in use by another collector process or another exporter whose id maps to the same directory ({e}); give each its own `storage` directory or exporter id",
                    dir.display()
                ),
            ));
        }
        let mut stored = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some((seq, points)) = parse_name(name) else {
                continue;
            };
            let queued_at_ms = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(unix_ms)
                .unwrap_or(0);
            stored.push(Stored {
                seq,
                points,
                queued_at_ms,
            });
        }
        stored.sort_by_key(|s| s.seq);
        let next = stored.last().map_or(1, |s| s.seq.saturating_add(1));
        Ok((
            Self {
                dir,
                next: AtomicU64::new(next),
                fsync,
                _lock: lock,
            },
            stored,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `batch` and returns its sequence number.
    pub fn write(&self, batch: &Batch) -> io::Result<u64> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!("{seq:020}.tmp"));
        let result = (|| {
            let mut file = fs::File::create(&tmp)?;
            io::Write::write_all(&mut file, &batch.encode_request())?;
            if self.fsync {
                // The data first, then the name: after a power cut a file is whole or absent.
                file.sync_all()?;
            }
            fs::rename(&tmp, self.path(seq, batch.point_count() as u64))?;
            if self.fsync {
                fs::File::open(&self.dir)?.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            // A full disk leaves no half file behind to fill it further.
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| seq)
    }

    pub fn read(&self, stored: &Stored) -> io::Result<Batch> {
        let bytes = fs::read(self.path(stored.seq, stored.points))?;
        let request =
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest::decode(
                &bytes[..],
            )
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let batch = Batch::from_request(request);
        // A file cut short (a power cut without fsync can leave it empty) is not a batch sent.
        if batch.point_count() as u64 != stored.points {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "holds {} points, its name says {}: truncated",
                    batch.point_count(),
                    stored.points
                ),
            ));
        }
        Ok(batch)
    }

    pub fn remove(&self, seq: u64, points: u64) -> io::Result<()> {
        fs::remove_file(self.path(seq, points))
    }

    fn path(&self, seq: u64, points: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}-{points}.batch"))
    }
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (seq, points) = name.strip_suffix(".batch")?.split_once('-')?;
    Some((seq.parse().ok()?, points.parse().ok()?))
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{kv, number_point, Metric, MetricExt};

    fn batch(v: f64, n: usize) -> Batch {
        let points = (0..n)
            .map(|i| number_point(7, v + i as f64, vec![kv("i", i as i64)]))
            .collect();
        Batch::with_resource(
            vec![kv("service.name", "t")],
            vec![Metric::gauge("g", "1", points)],
        )
    }

    #[test]
    fn batches_survive_a_reopen_in_order_and_half_writes_are_dropped() {
        let root = std::env::temp_dir().join(format!("dq-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (q, waiting) = DiskQueue::open(&root, "otlp/gw", false).unwrap();
        assert!(waiting.is_empty());
        let (a, b, c) = (batch(1.0, 3), batch(10.0, 2), batch(20.0, 1));
        let sa = q.write(&a).unwrap();
        let sb = q.write(&b).unwrap();
        let sc = q.write(&c).unwrap();
        q.remove(sb, 2).unwrap();
        fs::write(q.dir().join("00000000000000000009.tmp"), b"half").unwrap();
        fs::write(q.dir().join("notes.txt"), b"not ours").unwrap();
        drop(q);

        let (q, waiting) = DiskQueue::open(&root, "otlp/gw", false).unwrap();
        assert_eq!(
            waiting
                .iter()
                .map(|s| (s.seq, s.points))
                .collect::<Vec<_>>(),
            vec![(sa, 3), (sc, 1)]
        );
        assert!(waiting[0].queued_at_ms > 0);
        assert_eq!(q.read(&waiting[0]).unwrap(), a);
        assert_eq!(q.read(&waiting[1]).unwrap(), c);
        assert!(!q.dir().join("00000000000000000009.tmp").exists());
        assert_eq!(
            q.write(&b).unwrap(),
            sc + 1,
            "numbering goes on after the last"
        );

        fs::write(q.dir().join(format!("{:020}-5.batch", sc + 2)), b"\xff\xff").unwrap();
        drop(q);
        let (q, waiting) = DiskQueue::open(&root, "otlp/gw", false).unwrap();
        let err = q.read(waiting.last().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_file_a_power_cut_left_empty_is_corrupt_not_sent() {
        let root = std::env::temp_dir().join(format!("dq-cut-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (q, _) = DiskQueue::open(&root, "otlp", true).unwrap();
        let seq = q.write(&batch(1.0, 4)).unwrap();
        // What a power cut without fsync can leave: the name, not the data.
        fs::write(q.dir().join(format!("{seq:020}-4.batch")), b"").unwrap();
        drop(q);
        let (q, waiting) = DiskQueue::open(&root, "otlp", true).unwrap();
        let err = q.read(&waiting[0]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn one_writer_per_directory() {
        let root = std::env::temp_dir().join(format!("dq-lock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (first, _) = DiskQueue::open(&root, "otlp/a/b", true).unwrap();
        let e = DiskQueue::open(&root, "otlp/a__b", false).unwrap_err();
        assert!(
            e.to_string()
                .contains("is in use by another collector process"),
            "{e}"
        );
        assert!(
            DiskQueue::open(&root, "otlp/a/b", true).is_err(),
            "nor twice the same id"
        );
        drop(first);
        assert!(
            DiskQueue::open(&root, "otlp/a/b", true).is_ok(),
            "free again once closed"
        );
        let _ = fs::remove_dir_all(&root);
    }
}
