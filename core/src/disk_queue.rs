//! The persistent exporter queue (`sending_queue.storage`).
//!
//! Each batch an exporter accepts is written to a file of its own before it enters the
//! in-memory queue, and the file is removed once the batch is delivered or given up on; at start
//! the files left behind are delivered first, oldest first. Delivery is at-least-once: a batch
//! sent just before a kill is sent again. A file is written under a temporary name and renamed,
//! so a kill mid-write leaves a `.tmp` the next start removes, never half a batch. A killed
//! process loses nothing the kernel holds. With `fsync`, each file and then the directory are
//! flushed before the batch counts as queued, so a power cut loses nothing acknowledged; without
//! it, a power cut may lose the last batches. Each file starts with a header (magic, length,
//! CRC-32 of the payload), so a file a power cut left empty, short or garbled is detected and
//! dropped as corrupt, never counted as sent.
//!
//! The files of one directory, those left by earlier runs included, never take more than
//! `limit` bytes: a batch that would pass it is kept in memory only (the caller counts it), so
//! a crash loop during an outage cannot fill the volume. Files are private to the collector's
//! user (directory 0700, files 0600).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message as _;

use crate::model::Batch;

/// Starts every batch file: the format's name and version.
const MAGIC: &[u8; 4] = b"GCQ1";
/// Magic, payload length (u64 LE), CRC-32 of the payload (u32 LE).
const HEADER: usize = 4 + 8 + 4;

/// One exporter's directory of queued batches, `<storage>/<exporter id>/`.
#[derive(Debug)]
pub struct DiskQueue {
    dir: PathBuf,
    next: AtomicU64,
    /// Bytes of the batch files in the directory.
    bytes: AtomicU64,
    limit: u64,
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
    /// The file's size.
    pub bytes: u64,
    /// Unix milliseconds.
    pub queued_at_ms: u64,
}

/// The directory, under the storage root, of the exporter `id` (`/` is not allowed in a name).
fn dir_name(id: &str) -> String {
    id.replace('/', "__")
}

/// The ids below `parent` (`parent/...`) whose directories are under `root`: queues an earlier
/// run left for parts of an exporter that come and go (`loadbalancing`'s backends).
pub fn ids_below(root: &Path, parent: &str) -> Vec<String> {
    let prefix = dir_name(&format!("{parent}/"));
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix(&prefix)?;
            Some(format!("{parent}/{}", rest.replace("__", "/")))
        })
        .collect()
}

impl DiskQueue {
    /// Opens (creating) the directory for `exporter` under `root`, removes what an interrupted
    /// write left, and returns the batches waiting there, oldest first.
    pub fn open(
        root: &Path,
        exporter: &str,
        fsync: bool,
        limit: u64,
    ) -> io::Result<(Self, Vec<Stored>)> {
        let dir = root.join(dir_name(exporter));
        private_dir(&dir)
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
            let meta = entry.metadata().ok();
            let queued_at_ms = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .map_or(0, unix_ms);
            stored.push(Stored {
                seq,
                points,
                bytes: meta.map_or(0, |m| m.len()),
                queued_at_ms,
            });
        }
        stored.sort_by_key(|s| s.seq);
        let next = stored.last().map_or(1, |s| s.seq.saturating_add(1));
        let bytes = stored.iter().fold(0u64, |n, s| n.saturating_add(s.bytes));
        Ok((
            Self {
                dir,
                next: AtomicU64::new(next),
                bytes: AtomicU64::new(bytes),
                limit,
                fsync,
                _lock: lock,
            },
            stored,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of the batch files in the directory.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Writes `batch` and returns its sequence number; `StorageFull` when the directory's
    /// `limit` would be passed.
    pub fn write(&self, batch: &Batch) -> io::Result<u64> {
        let payload = batch.encode_request();
        let size = (HEADER + payload.len()) as u64;
        let before = self.bytes.fetch_add(size, Ordering::Relaxed);
        if before.saturating_add(size) > self.limit {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "storage_limit reached ({} of {} bytes used)",
                    before, self.limit
                ),
            ));
        }
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!("{seq:020}.tmp"));
        let result = (|| {
            let mut file = private_file(&tmp)?;
            let mut header = [0u8; HEADER];
            header[..4].copy_from_slice(MAGIC);
            header[4..12].copy_from_slice(&(payload.len() as u64).to_le_bytes());
            header[12..].copy_from_slice(&crc32(&payload).to_le_bytes());
            io::Write::write_all(&mut file, &header)?;
            io::Write::write_all(&mut file, &payload)?;
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
            self.bytes.fetch_sub(size, Ordering::Relaxed);
        }
        result.map(|()| seq)
    }

    pub fn read(&self, stored: &Stored) -> io::Result<Batch> {
        let bytes = fs::read(self.path(stored.seq, stored.points))?;
        let batch = decode_file(&bytes)?;
        // A name that promises other points than the file holds is not a batch to send.
        if batch.point_count() as u64 != stored.points {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "holds {} points, its name says {}: truncated or renamed",
                    batch.point_count(),
                    stored.points
                ),
            ));
        }
        Ok(batch)
    }

    pub fn remove(&self, seq: u64, points: u64) -> io::Result<()> {
        let path = self.path(seq, points);
        let size = fs::metadata(&path).map_or(0, |m| m.len());
        fs::remove_file(path)?;
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(size))
            });
        Ok(())
    }

    fn path(&self, seq: u64, points: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}-{points}.batch"))
    }
}

/// A batch file's contents back to its batch; `InvalidData` for anything but a whole file.
pub fn decode_file(bytes: &[u8]) -> io::Result<Batch> {
    let corrupt = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    if bytes.get(..4) != Some(MAGIC) {
        // Written before the header existed: the point count in the name is its only check.
        return ExportMetricsServiceRequest::decode(bytes)
            .map(Batch::from_request)
            .map_err(|e| corrupt(format!("not a batch file ({} bytes): {e}", bytes.len())));
    }
    if bytes.len() < HEADER {
        return Err(corrupt(format!(
            "{} bytes, a header cut short",
            bytes.len()
        )));
    }
    let len = u64::from_le_bytes(bytes[4..12].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(bytes[12..16].try_into().unwrap_or_default());
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != len {
        return Err(corrupt(format!(
            "holds {} bytes, its header says {len}: truncated",
            payload.len()
        )));
    }
    if crc32(payload) != crc {
        return Err(corrupt("checksum mismatch: the file is damaged".into()));
    }
    let request =
        ExportMetricsServiceRequest::decode(payload).map_err(|e| corrupt(e.to_string()))?;
    Ok(Batch::from_request(request))
}

fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

fn private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn private_file(path: &Path) -> io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// The sequence number and point count a batch file's name holds; `None` for a name this
/// queue did not write. Numbers past 2^63 are never written (one a nanosecond would take three
/// centuries), so such a name is foreign, and numbering can never wrap around.
pub fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (seq, points) = name.strip_suffix(".batch")?.split_once('-')?;
    let seq: u64 = seq.parse().ok()?;
    (seq <= i64::MAX as u64).then_some(())?;
    Some((seq, points.parse().ok()?))
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{kv, number_point, Metric, MetricExt};

    #[test]
    fn the_ids_below_an_exporter_come_back_from_their_directories() {
        let root = std::env::temp_dir().join(format!("dq-below-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for id in [
            "lb/agent/10.0.0.1:4317",
            "lb/agent/gw:4318/v1/metrics",
            "lb/agent",
            "lb/other/x:1",
        ] {
            let (q, _) = DiskQueue::open(&root, id, false, 1 << 30).unwrap();
            drop(q);
        }
        fs::write(root.join("lb__agent__file"), b"not a queue").unwrap();
        let mut ids = ids_below(&root, "lb/agent");
        ids.sort();
        assert_eq!(
            ids,
            ["lb/agent/10.0.0.1:4317", "lb/agent/gw:4318/v1/metrics"]
        );
        let _ = fs::remove_dir_all(&root);
    }

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
        let (q, waiting) = DiskQueue::open(&root, "otlp/gw", false, u64::MAX).unwrap();
        assert!(waiting.is_empty());
        let (a, b, c) = (batch(1.0, 3), batch(10.0, 2), batch(20.0, 1));
        let sa = q.write(&a).unwrap();
        let sb = q.write(&b).unwrap();
        let sc = q.write(&c).unwrap();
        q.remove(sb, 2).unwrap();
        fs::write(q.dir().join("00000000000000000009.tmp"), b"half").unwrap();
        fs::write(q.dir().join("notes.txt"), b"not ours").unwrap();
        drop(q);

        let (q, waiting) = DiskQueue::open(&root, "otlp/gw", false, u64::MAX).unwrap();
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
        let (q, waiting) = DiskQueue::open(&root, "otlp/gw", false, u64::MAX).unwrap();
        let err = q.read(waiting.last().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_file_a_power_cut_left_empty_is_corrupt_not_sent() {
        let root = std::env::temp_dir().join(format!("dq-cut-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (q, _) = DiskQueue::open(&root, "otlp", true, u64::MAX).unwrap();
        let seq = q.write(&batch(1.0, 4)).unwrap();
        // What a power cut without fsync can leave: the name, not the data.
        fs::write(q.dir().join(format!("{seq:020}-4.batch")), b"").unwrap();
        drop(q);
        let (q, waiting) = DiskQueue::open(&root, "otlp", true, u64::MAX).unwrap();
        let err = q.read(&waiting[0]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
        // Cut mid-payload, or one byte flipped: caught by the length and the checksum.
        let seq = q.write(&batch(2.0, 4)).unwrap();
        let path = q.dir().join(format!("{seq:020}-4.batch"));
        let whole = fs::read(&path).unwrap();
        assert_eq!(decode_file(&whole).unwrap(), batch(2.0, 4));
        let e = decode_file(&whole[..whole.len() - 3]).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let mut flipped = whole.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let e = decode_file(&flipped).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn the_directory_never_passes_its_limit_across_restarts() {
        let root = std::env::temp_dir().join(format!("dq-limit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let one = batch(1.0, 10);
        let size = (HEADER + one.encode_request().len()) as u64;
        let limit = size * 3;
        // Each "run" writes as much as it can, as a crash loop during an outage would.
        for _run in 0..3 {
            let (q, _) = DiskQueue::open(&root, "otlp", false, limit).unwrap();
            while q.write(&one).is_ok() {}
            let e = q.write(&one).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::StorageFull);
            assert!(e.to_string().contains("storage_limit"), "{e}");
            assert_eq!(q.bytes(), size * 3);
        }
        let (q, waiting) = DiskQueue::open(&root, "otlp", false, limit).unwrap();
        assert_eq!(
            waiting.len(),
            3,
            "earlier runs' files count against the limit"
        );
        q.remove(waiting[0].seq, waiting[0].points).unwrap();
        assert_eq!(q.bytes(), size * 2);
        assert!(q.write(&one).is_ok(), "room again once a batch is sent");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(q.dir()), 0o700);
            let file = fs::read_dir(q.dir())
                .unwrap()
                .flatten()
                .find(|e| e.file_name().to_string_lossy().ends_with(".batch"))
                .unwrap();
            assert_eq!(mode(&file.path()), 0o600, "queued metrics are private");
        }
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn one_writer_per_directory() {
        let root = std::env::temp_dir().join(format!("dq-lock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (first, _) = DiskQueue::open(&root, "otlp/a/b", true, u64::MAX).unwrap();
        let e = DiskQueue::open(&root, "otlp/a__b", false, u64::MAX).unwrap_err();
        assert!(
            e.to_string()
                .contains("is in use by another collector process"),
            "{e}"
        );
        assert!(
            DiskQueue::open(&root, "otlp/a/b", true, u64::MAX).is_err(),
            "nor twice the same id"
        );
        drop(first);
        assert!(
            DiskQueue::open(&root, "otlp/a/b", true, u64::MAX).is_ok(),
            "free again once closed"
        );
        let _ = fs::remove_dir_all(&root);
    }
}
