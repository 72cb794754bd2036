//! `nvml`: NVIDIA GPU readings through NVML, named by the OpenTelemetry hardware conventions.
//!
//! `libnvidia-ml.so.1` is loaded when the receiver starts, not when the binary does: on a
//! machine without the driver the receiver logs one line and idles (or, with `required: true`,
//! fails the start). A reading a GPU does not support is skipped for that GPU. Memory is NVML's
//! v1 accounting, as `nvidia-smi` shows it: `used` leaves out the few hundred MiB the driver
//! reserves, and percentages are of `total`.

pub mod pod_resources;

use std::path::PathBuf;
use std::time::Duration;

use genai_collector_core::config::duration;
use genai_collector_core::model::{
    kv, now_unix_nanos, number_point, Batch, KeyValue, Metric, MetricExt, NumberDataPoint,
};
use genai_collector_core::poll::{self, Poll, PollError, Schedule};
use genai_collector_core::{
    async_trait, BuildContext, ComponentConfig, ComponentError, Receiver, ReceiverContext,
    ReceiverFactory, ValidationError,
};
use serde::Deserialize;
use tracing::{info, warn};

use pod_resources::{Allocations, PodResourcesClient};

/// One GPU's (or MIG instance's) readings; `None` where the device does not support one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuReading {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// The physical GPU's UUID, for a MIG instance.
    pub parent_uuid: Option<String>,
    /// Bytes: total, used, free.
    pub memory: Option<(u64, u64, u64)>,
    /// Percent: GPU busy, memory controller busy.
    pub utilization: Option<(u32, u32)>,
    /// Percent busy of the video encoder and decoder.
    pub encoder_utilization: Option<u32>,
    pub decoder_utilization: Option<u32>,
    pub temperature_c: Option<u32>,
    pub power_mw: Option<u32>,
    pub power_limit_mw: Option<u32>,
    pub energy_mj: Option<u64>,
    pub clock_sm_mhz: Option<u32>,
    pub clock_mem_mhz: Option<u32>,
    /// Aggregate ECC errors: corrected, uncorrected.
    pub ecc: Option<(u64, u64)>,
    /// KB/s: transmit, receive.
    pub pcie_kbs: Option<(u32, u32)>,
    /// Active throttle reasons, e.g. `sw_power_cap`.
    pub throttle: Option<Vec<String>>,
    /// (pid, used bytes) of compute processes.
    pub processes: Vec<(u32, u64)>,
    /// (pid, mean SM utilisation in %) over the samples the driver holds (Maxwell and later).
    pub process_utilization: Vec<(u32, u32)>,
    /// Row remapping (Ampere and later): a remap waits for a reset, a remap failed.
    pub row_remap: Option<RowRemap>,
    /// Page retirement (before Ampere): pages wait for a reset to be retired.
    pub pages_pending_retirement: Option<bool>,
    /// Critical XID errors the driver reported since the last reading, by code.
    pub xid_errors: Vec<u64>,
    /// The receiver's tally: each XID code seen since it started, and how often.
    pub xid_totals: Vec<(u64, u64)>,
    /// The latest critical XID error, when one came within [`XID_DEGRADES_FOR`].
    pub recent_xid: Option<u64>,
}

/// How long a critical XID error keeps a GPU `degraded`: one event, not a state, so the
/// status holds long enough for an alert's `for:` to see it.
pub const XID_DEGRADES_FOR: Duration = Duration::from_secs(300);

/// NVML's row-remapper state: memory rows replaced after uncorrectable errors.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RowRemap {
    pub pending: bool,
    pub failed: bool,
}

/// A GPU's `hw.status`, from what NVML tells of its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuState {
    Ok,
    Degraded,
    Failed,
}

impl GpuState {
    pub const ALL: [GpuState; 3] = [GpuState::Ok, GpuState::Degraded, GpuState::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            GpuState::Ok => "ok",
            GpuState::Degraded => "degraded",
            GpuState::Failed => "failed",
        }
    }
}

/// Clock slowdowns the hardware imposes (overheating, power brake, a failing supply): unlike
/// the software power cap or an idle clock, they mean something is wrong.
const HARDWARE_SLOWDOWNS: [&str; 3] = [
    "hw_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
];

impl GpuReading {
    /// The state and why, or `None` when NVML gave none of the readings health is judged by.
    /// A failed row remap means the GPU needs replacing (NVIDIA's guidance); a pending remap or
    /// page retirement leaves memory unusable until a reset, and a hardware slowdown cuts clocks.
    pub fn health(&self) -> Option<(GpuState, &'static str)> {
        if self.row_remap.is_some_and(|r| r.failed) {
            return Some((GpuState::Failed, "row remapping failed"));
        }
        if self.row_remap.is_some_and(|r| r.pending) {
            return Some((GpuState::Degraded, "row remap pending a GPU reset"));
        }
        if self.pages_pending_retirement == Some(true) {
            return Some((GpuState::Degraded, "page retirement pending a GPU reset"));
        }
        if self.recent_xid.is_some() {
            return Some((
                GpuState::Degraded,
                "a critical XID error in the last 5 minutes",
            ));
        }
        if let Some(r) = self
            .throttle
            .iter()
            .flatten()
            .find_map(|r| HARDWARE_SLOWDOWNS.iter().find(|h| **h == r.as_str()))
        {
            return Some((GpuState::Degraded, r));
        }
        let known = self.row_remap.is_some()
            || self.pages_pending_retirement.is_some()
            || self.throttle.is_some();
        known.then_some((GpuState::Ok, "ok"))
    }
}

/// Where readings come from: NVML on a real machine, fixtures in tests.
pub trait GpuBackend: Send {
    fn driver_version(&self) -> Option<String>;
    fn read_all(&self) -> Result<Vec<GpuReading>, String>;
}

/// NVML, loaded once per process: receivers and Ollama's VRAM total share it, and an event set
/// can borrow it for as long as the process runs.
fn nvml() -> Result<&'static nvml_wrapper::Nvml, String> {
    static NVML: std::sync::OnceLock<Result<nvml_wrapper::Nvml, String>> =
        std::sync::OnceLock::new();
    NVML.get_or_init(|| nvml_wrapper::Nvml::init().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

/// NVML through `nvml-wrapper`, which opens the driver library at run time.
pub struct NvmlBackend {
    nvml: &'static nvml_wrapper::Nvml,
    /// Critical XID errors of the GPUs that report them; `None` where none can.
    xids: Option<nvml_wrapper::EventSet<'static>>,
}

impl NvmlBackend {
    /// Loads the driver library and listens for critical XID errors; an error when there is
    /// no driver.
    pub fn init() -> Result<Self, String> {
        let nvml = nvml()?;
        Ok(Self {
            nvml,
            xids: xid_events(nvml),
        })
    }

    /// Without the XID listener: for one-off readings beside a receiver's.
    fn readings_only() -> Result<Self, String> {
        Ok(Self {
            nvml: nvml()?,
            xids: None,
        })
    }

    /// The critical XID errors since the last call, by GPU UUID.
    fn drain_xids(&self) -> std::collections::HashMap<String, Vec<u64>> {
        use nvml_wrapper::enums::event::XidError;
        let mut out: std::collections::HashMap<String, Vec<u64>> = Default::default();
        let Some(set) = &self.xids else {
            return out;
        };
        // Bounded: a GPU in an error storm must not hold up the poll.
        for _ in 0..1024 {
            let Ok(event) = set.wait(0) else {
                break;
            };
            if let (Some(XidError::Value(xid)), Ok(uuid)) = (event.event_data, event.device.uuid())
            {
                out.entry(uuid).or_default().push(xid);
            }
        }
        out
    }

    fn read(dev: &nvml_wrapper::Device<'_>, index: u32, parent: Option<&str>) -> GpuReading {
        use nvml_wrapper::enum_wrappers::device::{
            Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor,
        };
        use nvml_wrapper::enums::device::UsedGpuMemory;
        let ecc = |kind| dev.total_ecc_errors(kind, EccCounter::Aggregate).ok();
        GpuReading {
            index,
            uuid: dev.uuid().unwrap_or_else(|_| format!("gpu-{index}")),
            name: dev.name().unwrap_or_default(),
            parent_uuid: parent.map(str::to_owned),
            memory: dev.memory_info().ok().map(|m| (m.total, m.used, m.free)),
            utilization: dev.utilization_rates().ok().map(|u| (u.gpu, u.memory)),
            encoder_utilization: dev.encoder_utilization().ok().map(|u| u.utilization),
            decoder_utilization: dev.decoder_utilization().ok().map(|u| u.utilization),
            temperature_c: dev.temperature(TemperatureSensor::Gpu).ok(),
            power_mw: dev.power_usage().ok(),
            power_limit_mw: dev.enforced_power_limit().ok(),
            energy_mj: dev.total_energy_consumption().ok(),
            clock_sm_mhz: dev.clock_info(Clock::SM).ok(),
            clock_mem_mhz: dev.clock_info(Clock::Memory).ok(),
            ecc: ecc(MemoryError::Corrected).zip(ecc(MemoryError::Uncorrected)),
            pcie_kbs: dev
                .pcie_throughput(PcieUtilCounter::Send)
                .ok()
                .zip(dev.pcie_throughput(PcieUtilCounter::Receive).ok()),
            throttle: dev.current_throttle_reasons().ok().map(|r| {
                r.iter_names()
                    .map(|(name, _)| name.to_ascii_lowercase())
                    .collect()
            }),
            processes: dev
                .running_compute_processes()
                .map(|ps| {
                    ps.into_iter()
                        .filter_map(|p| match p.used_gpu_memory {
                            UsedGpuMemory::Used(b) => Some((p.pid, b)),
                            UsedGpuMemory::Unavailable => None,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            process_utilization: dev
                .process_utilization_stats(None)
                .map(|samples| mean_by_pid(samples.iter().map(|s| (s.pid, s.sm_util))))
                .unwrap_or_default(),
            row_remap: remapped_rows(dev),
            pages_pending_retirement: dev.are_pages_pending_retired().ok(),
            ..Default::default()
        }
    }
}

/// The mean of each process's samples, in PID order.
fn mean_by_pid(samples: impl Iterator<Item = (u32, u32)>) -> Vec<(u32, u32)> {
    let mut sums: std::collections::BTreeMap<u32, (u64, u64)> = Default::default();
    for (pid, v) in samples {
        let e = sums.entry(pid).or_default();
        e.0 += u64::from(v);
        e.1 += 1;
    }
    sums.into_iter()
        .map(|(pid, (sum, n))| (pid, (sum / n) as u32))
        .collect()
}

/// `nvmlDeviceGetRemappedRows`, which nvml-wrapper resolves but does not wrap.
fn remapped_rows(dev: &nvml_wrapper::Device<'_>) -> Option<RowRemap> {
    let f = dev.nvml().lib().nvmlDeviceGetRemappedRows.as_ref().ok()?;
    let (mut corrected, mut uncorrected, mut pending, mut failed) = (0, 0, 0, 0);
    // SAFETY: the handle belongs to the live `Nvml` that `dev` borrows, and the four pointers
    // are to locals the call fills in.
    let rc = unsafe {
        f(
            dev.handle(),
            &mut corrected,
            &mut uncorrected,
            &mut pending,
            &mut failed,
        )
    };
    (rc == 0).then_some(RowRemap {
        pending: pending != 0,
        failed: failed != 0,
    })
}

impl GpuBackend for NvmlBackend {
    fn driver_version(&self) -> Option<String> {
        self.nvml.sys_driver_version().ok()
    }

    fn read_all(&self) -> Result<Vec<GpuReading>, String> {
        let mut xids = self.drain_xids();
        let count = self.nvml.device_count().map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(count as usize);
        for i in 0..count {
            let dev = match self.nvml.device_by_index(i) {
                Ok(d) => d,
                Err(e) => {
                    warn!(gpu = i, error = %e, "cannot open GPU");
                    continue;
                }
            };
            let mut reading = Self::read(&dev, i, None);
            reading.xid_errors = xids.remove(&reading.uuid).unwrap_or_default();
            // With MIG enabled, each instance is a device of its own.
            if dev.mig_mode().is_ok_and(|m| m.current == 1) {
                for m in 0..7 {
                    match dev.mig_device_by_index(m) {
                        Ok(mig) => out.push(Self::read(&mig, m, Some(&reading.uuid))),
                        Err(_) => break,
                    }
                }
            }
            out.push(reading);
        }
        Ok(out)
    }
}

/// An event set with every GPU that can report critical XID errors; `None` where none can.
fn xid_events(nvml: &'static nvml_wrapper::Nvml) -> Option<nvml_wrapper::EventSet<'static>> {
    use nvml_wrapper::bitmasks::event::EventTypes;
    let mut set = nvml.create_event_set().ok()?;
    let mut registered = 0;
    for i in 0..nvml.device_count().ok()? {
        let Ok(dev) = nvml.device_by_index(i) else {
            continue;
        };
        let supported = dev
            .supported_event_types()
            .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
        if !supported {
            continue;
        }
        // A failed registration releases the set: no XIDs then, the readings still come.
        match dev.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => {
                set = s;
                registered += 1;
            }
            Err(e) => {
                warn!(gpu = i, error = %e, "cannot listen for XID errors");
                return None;
            }
        }
    }
    (registered > 0).then_some(set)
}

/// The sum of every GPU's memory on this host, if NVML can say (for Ollama's percentages).
pub fn total_gpu_memory() -> Option<u64> {
    let backend = NvmlBackend::readings_only().ok()?;
    let total: u64 = backend
        .read_all()
        .ok()?
        .iter()
        .filter(|g| g.parent_uuid.is_none())
        .filter_map(|g| g.memory)
        .map(|m| m.0)
        .sum();
    (total > 0).then_some(total)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NvmlConfig {
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Fail the start when no NVIDIA driver is found, instead of idling.
    pub required: bool,
    /// Per-process GPU memory, with the container or pod read from the process's cgroup.
    pub processes: bool,
    /// The kubelet's pod-resources socket: each GPU's resource gets the namespace, pod and
    /// container it is allocated to.
    pub pod_resources_socket: Option<PathBuf>,
    /// Also emit power, energy and temperature under OpenLIT's GPU collector names
    /// (`hw.gpu.power.draw`, `hw.gpu.energy.consumed`, `hw.gpu.temperature`), for dashboards
    /// built on them.
    pub openlit_names: bool,
}

impl Default for NvmlConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            required: false,
            processes: true,
            pod_resources_socket: None,
            openlit_names: false,
        }
    }
}

impl ComponentConfig for NvmlConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.interval < Duration::from_millis(100) {
            return Err(ValidationError::field("interval", "must be at least 100ms"));
        }
        Ok(())
    }
}

pub struct NvmlReceiverFactory;

impl ReceiverFactory for NvmlReceiverFactory {
    type Config = NvmlConfig;

    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn description(&self) -> &'static str {
        "NVIDIA GPU memory, utilization, temperature, power, energy, clocks, ECC, PCIe, throttling, per-process memory"
    }

    fn build(
        &self,
        config: NvmlConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Receiver>, ComponentError> {
        let backend = match NvmlBackend::init() {
            Ok(b) => Some(b),
            Err(e) if config.required => {
                return Err(ComponentError::Config(format!(
                    "no NVIDIA driver: cannot load libnvidia-ml.so.1 ({e}), and `required: true`"
                )))
            }
            Err(e) => {
                info!(error = %e, "no NVIDIA driver (libnvidia-ml.so.1): the nvml receiver idles");
                None
            }
        };
        Ok(Box::new(NvmlReceiver {
            config,
            backend: backend.map(|b| Box::new(b) as Box<dyn GpuBackend>),
        }))
    }
}

pub struct NvmlReceiver {
    config: NvmlConfig,
    backend: Option<Box<dyn GpuBackend>>,
}

impl NvmlReceiver {
    /// A receiver reading from `backend`; for tests and other GPU sources.
    pub fn with_backend(config: NvmlConfig, backend: Box<dyn GpuBackend>) -> Self {
        Self {
            config,
            backend: Some(backend),
        }
    }
}

#[async_trait]
impl Receiver for NvmlReceiver {
    async fn run(self: Box<Self>, ctx: ReceiverContext) -> Result<(), ComponentError> {
        let Some(backend) = self.backend else {
            ctx.shutdown.cancelled().await;
            return Ok(());
        };
        let config = self.config;
        let pods = config
            .pod_resources_socket
            .as_deref()
            .map(|s| PodResourcesClient::new(s, config.interval.min(Duration::from_secs(2))));
        let schedule = Schedule::every(config.interval);
        let poller = GpuPoll {
            driver: backend.driver_version(),
            backend,
            pods,
            health: HealthLog::default(),
            xids: XidTally::default(),
            service: ctx.id.to_string(),
            config,
        };
        poll::run(poller, schedule, ctx).await
    }
}

struct GpuPoll {
    config: NvmlConfig,
    backend: Box<dyn GpuBackend>,
    driver: Option<String>,
    pods: Option<PodResourcesClient>,
    health: HealthLog,
    xids: XidTally,
    service: String,
}

/// Critical XID errors per GPU since the receiver started.
#[derive(Default)]
struct XidTally(std::collections::HashMap<String, GpuXids>);

#[derive(Default)]
struct GpuXids {
    /// Code → how often.
    totals: std::collections::BTreeMap<u64, u64>,
    latest: Option<(u64, std::time::Instant)>,
}

impl XidTally {
    fn observe(&mut self, gpus: &mut [GpuReading]) {
        let now = std::time::Instant::now();
        for g in gpus.iter_mut() {
            if g.xid_errors.is_empty() && !self.0.contains_key(&g.uuid) {
                continue;
            }
            let seen = self.0.entry(g.uuid.clone()).or_default();
            for xid in &g.xid_errors {
                *seen.totals.entry(*xid).or_default() += 1;
                seen.latest = Some((*xid, now));
                warn!(gpu = %g.uuid, xid, "critical XID error");
            }
            g.xid_totals = seen.totals.iter().map(|(x, n)| (*x, *n)).collect();
            g.recent_xid = seen
                .latest
                .filter(|(_, at)| now.duration_since(*at) < XID_DEGRADES_FOR)
                .map(|(x, _)| x);
        }
    }
}

#[async_trait]
impl Poll for GpuPoll {
    async fn poll(&mut self) -> Result<Batch, PollError> {
        // Without an answer the GPUs go out unattributed rather than with a stale pod.
        let (allocations, kubelet) = match &mut self.pods {
            Some(client) => match client.list().await {
                Ok(a) => (a, None),
                Err(e) => (
                    Allocations::new(),
                    Some(format!("{e}; GPUs go out without their pods")),
                ),
            },
            None => (Allocations::new(), None),
        };
        let mut gpus = self
            .backend
            .read_all()
            .map_err(|e| PollError::new(format!("cannot read the GPUs: {e}")))?;
        self.xids.observe(&mut gpus);
        self.health.observe(&gpus);
        let mut batch = to_batch(
            &gpus,
            self.driver.as_deref(),
            &self.config,
            &allocations,
            now_unix_nanos(),
        );
        for r in batch
            .resource_metrics
            .iter_mut()
            .filter_map(|rm| rm.resource.as_mut())
        {
            r.attributes.push(kv("service.name", self.service.as_str()));
        }
        match kubelet {
            Some(e) => Err(PollError::new(e).with_batch(batch)),
            None => Ok(batch),
        }
    }
}

/// Logs each change of a GPU's `hw.status`, with its reason, so that the metric's moves have
/// an explanation in the logs.
#[derive(Default)]
struct HealthLog(std::collections::HashMap<String, GpuState>);

impl HealthLog {
    fn observe(&mut self, gpus: &[GpuReading]) {
        for g in gpus {
            let Some((state, reason)) = g.health() else {
                continue;
            };
            let before = self.0.insert(g.uuid.clone(), state);
            let changed = before.map_or(state != GpuState::Ok, |b| b != state);
            match state {
                _ if !changed => {}
                GpuState::Ok => info!(gpu = %g.uuid, state = "ok", "GPU health"),
                _ => warn!(gpu = %g.uuid, state = state.as_str(), reason, "GPU health"),
            }
        }
    }
}

/// The batch for one poll: one resource per GPU, carrying its identity and, where the kubelet
/// allocated it to exactly one container, that container's namespace, pod and name (a GPU
/// time-sliced among several keeps none: no one pod owns its readings).
pub fn to_batch(
    gpus: &[GpuReading],
    driver: Option<&str>,
    config: &NvmlConfig,
    pods: &Allocations,
    now: u64,
) -> Batch {
    let mut batch = Batch::new();
    for g in gpus {
        let mut resource = vec![
            kv("hw.id", g.uuid.as_str()),
            kv("hw.name", g.name.as_str()),
            kv("hw.model", g.name.as_str()),
            kv("hw.vendor", "NVIDIA"),
            kv("hw.type", "gpu"),
            kv("gpu.index", i64::from(g.index)),
        ];
        if let Some(d) = driver {
            resource.push(kv("hw.driver_version", d));
        }
        if let Some(p) = &g.parent_uuid {
            resource.push(kv("hw.parent", p.as_str()));
        }
        if let Some([holder]) = pods.get(&g.uuid).map(Vec::as_slice) {
            resource.extend([
                kv("k8s.namespace.name", holder.namespace.as_str()),
                kv("k8s.pod.name", holder.pod.as_str()),
                kv("k8s.container.name", holder.container.as_str()),
            ]);
        }
        batch.push_resource(resource, gpu_metrics(g, config, now));
    }
    batch
}

/// One GPU's metrics. `hw.id` is on every point, as the hardware conventions require: GPUs of
/// one node (or of every node, at a gateway) stay apart where only point attributes label a
/// series. The generic `hw.*` metrics (power, energy, temperature, errors, status) also carry
/// `hw.type`, which they require.
fn gpu_metrics(g: &GpuReading, config: &NvmlConfig, now: u64) -> Vec<Metric> {
    let id = || kv("hw.id", g.uuid.as_str());
    let with = |v: f64, extra: Vec<KeyValue>| {
        let mut attrs = vec![id()];
        attrs.extend(extra);
        number_point(now, v, attrs)
    };
    let point = |v: f64| vec![with(v, vec![])];
    let generic = |v: f64| vec![with(v, vec![kv("hw.type", "gpu")])];
    let mut m = Vec::new();
    if let Some((total, used, free)) = g.memory {
        m.push(Metric::sum(
            "hw.gpu.memory.limit",
            "By",
            false,
            point(total as f64),
        ));
        m.push(Metric::sum(
            "hw.gpu.memory.usage",
            "By",
            false,
            point(used as f64),
        ));
        m.push(Metric::sum(
            "hw.gpu.memory.free",
            "By",
            false,
            point(free as f64),
        ));
        if total > 0 {
            m.push(Metric::gauge(
                "hw.gpu.memory.utilization",
                "1",
                point(used as f64 / total as f64),
            ));
        }
    }
    let tasks: Vec<NumberDataPoint> = [
        ("general", g.utilization.map(|u| u.0)),
        ("encoder", g.encoder_utilization),
        ("decoder", g.decoder_utilization),
    ]
    .into_iter()
    .filter_map(|(task, pct)| {
        pct.map(|p| with(f64::from(p) / 100.0, vec![kv("hw.gpu.task", task)]))
    })
    .collect();
    if !tasks.is_empty() {
        m.push(Metric::gauge("hw.gpu.utilization", "1", tasks));
    }
    if let Some((_, mem)) = g.utilization {
        m.push(Metric::gauge(
            "hw.gpu.memory_controller.utilization",
            "1",
            point(f64::from(mem) / 100.0),
        ));
    }
    let watts = g.power_mw.map(|mw| f64::from(mw) / 1000.0);
    let joules = g.energy_mj.map(|mj| mj as f64 / 1000.0);
    let celsius = g.temperature_c.map(f64::from);
    if let Some(w) = watts {
        m.push(Metric::gauge("hw.power", "W", generic(w)));
    }
    if let Some(j) = joules {
        m.push(Metric::sum("hw.energy", "J", true, generic(j)));
    }
    if let Some(c) = celsius {
        m.push(Metric::gauge("hw.temperature", "Cel", generic(c)));
    }
    if config.openlit_names {
        if let Some(w) = watts {
            m.push(Metric::gauge("hw.gpu.power.draw", "W", point(w)));
        }
        if let Some(j) = joules {
            m.push(Metric::sum("hw.gpu.energy.consumed", "J", true, point(j)));
        }
        if let Some(c) = celsius {
            m.push(Metric::gauge("hw.gpu.temperature", "Cel", point(c)));
        }
    }
    let mut opt = |name: &str, unit: &str, v: Option<f64>| {
        if let Some(v) = v {
            m.push(Metric::gauge(name, unit, point(v)));
        }
    };
    opt(
        "hw.gpu.power.limit",
        "W",
        g.power_limit_mw.map(|mw| f64::from(mw) / 1000.0),
    );
    opt(
        "hw.gpu.clock.graphics",
        "MHz",
        g.clock_sm_mhz.map(f64::from),
    );
    opt("hw.gpu.clock.memory", "MHz", g.clock_mem_mhz.map(f64::from));
    if let Some((corrected, uncorrected)) = g.ecc {
        let p = |v: u64, t: &str| with(v as f64, vec![kv("hw.type", "gpu"), kv("error.type", t)]);
        m.push(Metric::sum(
            "hw.errors",
            "{error}",
            true,
            vec![p(corrected, "corrected"), p(uncorrected, "uncorrected")],
        ));
    }
    if !g.xid_totals.is_empty() {
        let points = g
            .xid_totals
            .iter()
            .map(|(xid, n)| with(*n as f64, vec![kv("hw.gpu.xid", *xid as i64)]))
            .collect();
        m.push(Metric::sum("hw.gpu.xid_errors", "{error}", true, points));
    }
    if let Some((state, _)) = g.health() {
        let points = GpuState::ALL
            .iter()
            .map(|s| {
                with(
                    f64::from(u8::from(*s == state)),
                    vec![kv("hw.type", "gpu"), kv("hw.state", s.as_str())],
                )
            })
            .collect();
        m.push(Metric::sum("hw.status", "1", false, points));
    }
    if let Some((tx, rx)) = g.pcie_kbs {
        // NVML's KB are 1000 bytes; the rate is sampled over 20 ms, so no byte counter
        // (`hw.gpu.io`) can be built from it.
        let p =
            |kbs: u32, d: &str| with(f64::from(kbs) * 1000.0, vec![kv("network.io.direction", d)]);
        m.push(Metric::gauge(
            "hw.gpu.pcie.throughput",
            "By/s",
            vec![p(tx, "transmit"), p(rx, "receive")],
        ));
    }
    if let Some(reasons) = &g.throttle {
        let mut points: Vec<NumberDataPoint> = reasons
            .iter()
            .map(|r| with(1.0, vec![kv("hw.gpu.throttle.reason", r.as_str())]))
            .collect();
        if points.is_empty() {
            points.push(with(0.0, vec![kv("hw.gpu.throttle.reason", "none")]));
        }
        m.push(Metric::gauge("hw.gpu.throttled", "", points));
    }
    if config.processes && !g.processes.is_empty() {
        let points = g
            .processes
            .iter()
            .map(|(pid, bytes)| {
                let mut attrs = process_attrs(*pid);
                attrs.insert(0, id());
                number_point(now, *bytes as f64, attrs)
            })
            .collect();
        m.push(Metric::gauge("hw.gpu.process.memory.usage", "By", points));
    }
    if config.processes && !g.process_utilization.is_empty() {
        let points = g
            .process_utilization
            .iter()
            .map(|(pid, percent)| {
                let attrs = vec![id(), kv("process.pid", i64::from(*pid))];
                number_point(now, f64::from(*percent) / 100.0, attrs)
            })
            .collect();
        m.push(Metric::gauge("hw.gpu.process.utilization", "1", points));
    }
    m
}

/// `process.pid`, and the container and pod read from the process's cgroup when visible.
fn process_attrs(pid: u32) -> Vec<KeyValue> {
    let mut attrs = vec![kv("process.pid", i64::from(pid))];
    if let Ok(cgroup) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
        let (container, pod) = parse_cgroup(&cgroup);
        if let Some(c) = container {
            attrs.push(kv("container.id", c));
        }
        if let Some(p) = pod {
            attrs.push(kv("k8s.pod.uid", p));
        }
    }
    attrs
}

/// The container id (64 hex digits) and Kubernetes pod UID in a `/proc/PID/cgroup` file.
pub fn parse_cgroup(text: &str) -> (Option<String>, Option<String>) {
    let mut container = None;
    let mut pod = None;
    for segment in text
        .lines()
        .flat_map(|l| l.rsplit(':').next().unwrap_or("").split('/'))
    {
        let seg = segment.trim_end_matches(".scope");
        let id = seg.rsplit(['-', ':']).next().unwrap_or(seg);
        if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            container = Some(id.to_owned());
        }
        if let Some(p) = seg
            .strip_prefix("kubepods")
            .and_then(|s| s.rsplit_once("pod"))
            .map(|(_, p)| p.trim_end_matches(".slice"))
        {
            if p.len() >= 32 {
                pod = Some(p.replace('_', "-"));
            }
        }
    }
    (container, pod)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use genai_collector_core::model::{metric, number_value, AttributesExt};

    #[test]
    fn per_process_utilisation_is_the_mean_of_each_processs_samples() {
        let samples = [(7, 30), (3, 50), (7, 10)];
        assert_eq!(mean_by_pid(samples.into_iter()), [(3, 50), (7, 20)]);
        let g = GpuReading {
            uuid: "GPU-x".into(),
            process_utilization: vec![(3, 50)],
            ..Default::default()
        };
        let m = gpu_metrics(&g, &NvmlConfig::default(), 1);
        let util = m
            .iter()
            .find(|m| m.name == "hw.gpu.process.utilization")
            .unwrap();
        let Some(metric::Data::Gauge(gauge)) = &util.data else {
            panic!("a gauge")
        };
        assert_eq!(number_value(&gauge.data_points[0]), Some(0.5));
        assert_eq!(
            gauge.data_points[0].attributes.get_str("hw.id"),
            Some("GPU-x")
        );
    }

    /// A fake H100 under load, from `tests/fixtures/nvml` (nvidia-smi's CSVs and the
    /// nvml-wrapper probe of the same machine).
    pub(crate) struct FixtureGpu;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/../tests/fixtures/nvml/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    /// The value inside `Ok(...)` after `key` on the probe's lines.
    fn probe(text: &str, key: &str) -> String {
        let at = text.find(key).unwrap_or_else(|| panic!("{key}")) + key.len();
        let rest = &text[at..];
        let start = rest.find("Ok(").unwrap() + 3;
        let end = start + rest[start..].find(')').unwrap();
        rest[start..end].trim_matches(['(', '"']).to_owned()
    }

    impl GpuBackend for FixtureGpu {
        fn driver_version(&self) -> Option<String> {
            Some(probe(&fixture("nvml-wrapper-loaded.txt"), "driver "))
        }

        fn read_all(&self) -> Result<Vec<GpuReading>, String> {
            let csv = fixture("nvidia-smi-query-loaded.csv");
            let row: Vec<String> = csv
                .lines()
                .nth(1)
                .unwrap()
                .split(", ")
                .map(str::to_owned)
                .collect();
            let num = |i: usize| row[i].split(' ').next().unwrap().parse::<f64>().unwrap();
            let mib = |i: usize| (num(i) * 1024.0 * 1024.0) as u64;
            let p = fixture("nvml-wrapper-loaded.txt");
            let apps = fixture("nvidia-smi-apps-loaded.csv");
            let processes = apps
                .lines()
                .skip(1)
                .map(|l| {
                    let f: Vec<&str> = l.split(", ").collect();
                    (
                        f[0].parse().unwrap(),
                        f[2].split(' ').next().unwrap().parse::<u64>().unwrap() * 1024 * 1024,
                    )
                })
                .collect();
            let pair = |key: &str| -> (u64, u64) {
                let v = probe(&p, key);
                let mut it = v.split(", ").map(|x| x.parse::<u64>().unwrap());
                (it.next().unwrap(), it.next().unwrap())
            };
            let util = pair("util ");
            let q = fixture("nvidia-smi-q-loaded.xml");
            let xml = |tag: &str| {
                let open = format!("<{tag}>");
                let at = q.find(&open).unwrap_or_else(|| panic!("{tag}")) + open.len();
                q[at..at + q[at..].find('<').unwrap()].to_owned()
            };
            let percent = |tag: &str| xml(tag).trim_end_matches(" %").parse().ok();
            Ok(vec![GpuReading {
                index: 0,
                uuid: "GPU-00000000-1111-2222-3333-555555555555".into(),
                name: row[1].clone(),
                parent_uuid: None,
                memory: Some((mib(2), mib(3), mib(4))),
                utilization: Some((util.0 as u32, util.1 as u32)),
                encoder_utilization: percent("encoder_util"),
                decoder_utilization: percent("decoder_util"),
                temperature_c: Some(num(7) as u32),
                power_mw: Some((num(8) * 1000.0) as u32),
                power_limit_mw: Some((num(9) * 1000.0) as u32),
                energy_mj: Some(probe(&p, "energy_mj ").parse().unwrap()),
                clock_sm_mhz: Some(num(10) as u32),
                clock_mem_mhz: Some(num(11) as u32),
                ecc: Some((probe(&p, "ecc ").parse().unwrap(), 0)),
                pcie_kbs: Some((probe(&p, "KB/s ").parse().unwrap(), 19928)),
                throttle: Some(vec![probe(&p, "throttle ")
                    .trim_start_matches("ThrottleReasons(")
                    .to_ascii_lowercase()]),
                processes,
                row_remap: Some(RowRemap {
                    pending: xml("remapped_row_pending") == "Yes",
                    failed: xml("remapped_row_failure") == "Yes",
                }),
                pages_pending_retirement: match xml("pending_retirement").as_str() {
                    "N/A" => None,
                    v => Some(v == "Yes"),
                },
                ..Default::default()
            }])
        }
    }

    /// The number points of the metric `name` (gauge or sum).
    fn points<'a>(batch: &'a Batch, name: &str) -> &'a [NumberDataPoint] {
        let m = batch
            .metrics()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no {name}"));
        match &m.data {
            Some(metric::Data::Gauge(g)) => &g.data_points,
            Some(metric::Data::Sum(s)) => &s.data_points,
            _ => panic!("{name}"),
        }
    }

    /// The first point's value of the metric `name`.
    fn gauge(batch: &Batch, name: &str) -> f64 {
        number_value(&points(batch, name)[0]).unwrap()
    }

    fn point(batch: &Batch, name: &str, key: &str, value: &str) -> f64 {
        let p = points(batch, name)
            .iter()
            .find(|p| p.attributes.get_str(key) == Some(value))
            .unwrap_or_else(|| panic!("no {name} with {key}={value}"));
        number_value(p).unwrap()
    }

    #[test]
    fn readings_match_nvidia_smi_on_the_loaded_h100() {
        let gpus = FixtureGpu.read_all().unwrap();
        let b = to_batch(
            &gpus,
            FixtureGpu.driver_version().as_deref(),
            &NvmlConfig::default(),
            &Allocations::new(),
            1,
        );
        let res = &b.resource_metrics[0].resource.as_ref().unwrap().attributes;
        assert_eq!(
            res.get_str("hw.id"),
            Some("GPU-00000000-1111-2222-3333-555555555555")
        );
        assert_eq!(res.get_str("hw.model"), Some("NVIDIA H100 80GB HBM3"));
        assert_eq!(res.get_str("hw.driver_version"), Some("580.159.04"));
        // nvidia-smi: 81559 MiB total, 1011 MiB used, 100 % / 30 %, 61 C, 696.09 W of 700 W.
        assert_eq!(gauge(&b, "hw.gpu.memory.limit"), 81559.0 * 1048576.0);
        assert_eq!(gauge(&b, "hw.gpu.memory.usage"), 1011.0 * 1048576.0);
        assert!((gauge(&b, "hw.gpu.memory.utilization") - 1011.0 / 81559.0).abs() < 1e-9);
        assert_eq!(
            point(&b, "hw.gpu.utilization", "hw.gpu.task", "general"),
            1.0
        );
        assert_eq!(
            point(&b, "hw.gpu.utilization", "hw.gpu.task", "encoder"),
            0.0
        );
        assert_eq!(
            point(&b, "hw.gpu.utilization", "hw.gpu.task", "decoder"),
            0.0
        );
        // The nvml-wrapper probe, a moment after nvidia-smi's 30 %.
        assert_eq!(gauge(&b, "hw.gpu.memory_controller.utilization"), 0.31);
        assert_eq!(gauge(&b, "hw.temperature"), 61.0);
        assert!((gauge(&b, "hw.power") - 696.09).abs() < 1e-9);
        assert_eq!(gauge(&b, "hw.gpu.power.limit"), 700.0);
        assert_eq!(gauge(&b, "hw.gpu.clock.graphics"), 1305.0);
        assert_eq!(gauge(&b, "hw.energy"), 7495.83);
        assert_eq!(point(&b, "hw.errors", "error.type", "corrected"), 0.0);
        assert_eq!(point(&b, "hw.errors", "error.type", "uncorrected"), 0.0);
        // nvidia-smi: no row remap pending or failed, only the software power cap.
        assert_eq!(point(&b, "hw.status", "hw.state", "ok"), 1.0);
        assert_eq!(point(&b, "hw.status", "hw.state", "degraded"), 0.0);
        assert_eq!(point(&b, "hw.status", "hw.state", "failed"), 0.0);
        for name in [
            "hw.power",
            "hw.energy",
            "hw.temperature",
            "hw.errors",
            "hw.status",
        ] {
            for p in points(&b, name) {
                assert_eq!(p.attributes.get_str("hw.type"), Some("gpu"), "{name}");
            }
        }
        // Memory is an UpDownCounter, energy a counter; the OpenLIT names only on request.
        for (name, monotonic) in [("hw.gpu.memory.usage", false), ("hw.energy", true)] {
            let m = b.metrics().find(|m| m.name == name).unwrap();
            let Some(metric::Data::Sum(s)) = &m.data else {
                panic!("{name} is not a sum")
            };
            assert_eq!(s.is_monotonic, monotonic, "{name}");
        }
        assert!(b.metrics().all(|m| m.name != "hw.gpu.power.draw"));
        let openlit = NvmlConfig {
            openlit_names: true,
            ..Default::default()
        };
        let aliased = to_batch(&gpus, None, &openlit, &Allocations::new(), 1);
        assert_eq!(gauge(&aliased, "hw.gpu.power.draw"), gauge(&b, "hw.power"));
        assert_eq!(gauge(&aliased, "hw.gpu.energy.consumed"), 7495.83);
        assert_eq!(gauge(&aliased, "hw.gpu.temperature"), 61.0);
        let throttled = b.metrics().find(|m| m.name == "hw.gpu.throttled").unwrap();
        let Some(metric::Data::Gauge(g)) = &throttled.data else {
            panic!()
        };
        assert_eq!(
            g.data_points[0]
                .attributes
                .get_str("hw.gpu.throttle.reason"),
            Some("sw_power_cap")
        );
        let procs = b
            .metrics()
            .find(|m| m.name == "hw.gpu.process.memory.usage")
            .unwrap();
        assert_eq!(procs.point_count(), 1);
        assert_eq!(gauge(&b, "hw.gpu.process.memory.usage"), 1002.0 * 1048576.0);
    }

    #[test]
    fn every_point_names_its_gpu() {
        let mut gpus = FixtureGpu.read_all().unwrap();
        let mut second = gpus[0].clone();
        second.index = 1;
        second.uuid = "GPU-second".into();
        gpus.push(second);
        let b = to_batch(&gpus, None, &NvmlConfig::default(), &Allocations::new(), 1);
        for rm in &b.resource_metrics {
            let gpu = rm.resource.as_ref().unwrap().attributes.get_str("hw.id");
            for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
                let points = match &m.data {
                    Some(metric::Data::Gauge(g)) => &g.data_points,
                    Some(metric::Data::Sum(s)) => &s.data_points,
                    _ => panic!("{}", m.name),
                };
                for p in points {
                    assert_eq!(p.attributes.get_str("hw.id"), gpu, "{}", m.name);
                }
            }
        }
    }

    #[test]
    fn unsupported_readings_are_skipped() {
        // The idle capture's fan reading failed (data-centre card): a GPU with little support
        // still yields what it has.
        let g = GpuReading {
            uuid: "GPU-x".into(),
            memory: Some((100, 10, 90)),
            ..Default::default()
        };
        let b = to_batch(&[g], None, &NvmlConfig::default(), &Allocations::new(), 1);
        let names: Vec<&str> = b.metrics().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "hw.gpu.memory.limit",
                "hw.gpu.memory.usage",
                "hw.gpu.memory.free",
                "hw.gpu.memory.utilization"
            ]
        );
    }

    #[test]
    fn health_from_row_remapping_page_retirement_and_hardware_slowdowns() {
        let healthy = GpuReading {
            row_remap: Some(RowRemap::default()),
            throttle: Some(vec!["sw_power_cap".into()]),
            ..Default::default()
        };
        assert_eq!(healthy.health(), Some((GpuState::Ok, "ok")));
        let state = |g: GpuReading| g.health().map(|h| h.0);
        let slowed = GpuReading {
            throttle: Some(vec!["gpu_idle".into(), "hw_thermal_slowdown".into()]),
            ..healthy.clone()
        };
        assert_eq!(
            slowed.health(),
            Some((GpuState::Degraded, "hw_thermal_slowdown"))
        );
        let pending = GpuReading {
            row_remap: Some(RowRemap {
                pending: true,
                failed: false,
            }),
            ..healthy.clone()
        };
        assert_eq!(state(pending), Some(GpuState::Degraded));
        let retiring = GpuReading {
            row_remap: None,
            pages_pending_retirement: Some(true),
            ..healthy.clone()
        };
        assert_eq!(state(retiring), Some(GpuState::Degraded));
        let xid = GpuReading {
            recent_xid: Some(79),
            ..healthy.clone()
        };
        assert_eq!(state(xid), Some(GpuState::Degraded));
        let failed = GpuReading {
            row_remap: Some(RowRemap {
                pending: true,
                failed: true,
            }),
            ..slowed
        };
        assert_eq!(state(failed.clone()), Some(GpuState::Failed));
        let b = to_batch(
            &[failed],
            None,
            &NvmlConfig::default(),
            &Allocations::new(),
            1,
        );
        assert_eq!(point(&b, "hw.status", "hw.state", "failed"), 1.0);
        assert_eq!(point(&b, "hw.status", "hw.state", "ok"), 0.0);
        // Nothing known, nothing claimed.
        assert_eq!(GpuReading::default().health(), None);
    }

    #[test]
    fn xid_errors_are_counted_and_degrade_for_a_while() {
        let mut tally = XidTally::default();
        let gpu = |xids: Vec<u64>| GpuReading {
            uuid: "GPU-x".into(),
            xid_errors: xids,
            ..Default::default()
        };
        let mut quiet = [gpu(vec![])];
        tally.observe(&mut quiet);
        assert_eq!((quiet[0].recent_xid, quiet[0].xid_totals.len()), (None, 0));
        let mut burst = [gpu(vec![79, 48, 79])];
        tally.observe(&mut burst);
        assert_eq!(burst[0].xid_totals, [(48, 1), (79, 2)]);
        assert_eq!(burst[0].recent_xid, Some(79));
        // The next poll has no new event: the totals stay, and so does the degradation.
        let mut after = [gpu(vec![])];
        tally.observe(&mut after);
        assert_eq!(after[0].xid_totals, [(48, 1), (79, 2)]);
        assert_eq!(after[0].health().map(|h| h.0), Some(GpuState::Degraded));
        let b = to_batch(&after, None, &NvmlConfig::default(), &Allocations::new(), 1);
        let counts: Vec<(String, f64)> = points(&b, "hw.gpu.xid_errors")
            .iter()
            .map(|p| {
                let xid = genai_collector_core::model::display_attrs(&p.attributes, ",");
                (xid, number_value(p).unwrap())
            })
            .collect();
        assert_eq!(counts.len(), 2);
        assert!(
            counts
                .iter()
                .any(|(a, v)| a.contains("hw.gpu.xid=79") && *v == 2.0),
            "{counts:?}"
        );
    }

    #[test]
    fn container_and_pod_from_cgroups() {
        let docker = "0::/system.slice/docker-3f1c2a9b8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928170615243a.scope\n";
        assert_eq!(
            parse_cgroup(docker).0.as_deref(),
            Some("3f1c2a9b8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928170615243a")
        );
        let k8s = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7d9f8c6b_5a4e_4c3d_9b2a_1f0e9d8c7b6a.slice/cri-containerd-aa11bb22cc33dd44ee55ff66aa11bb22cc33dd44ee55ff66aa11bb22cc33dd44.scope\n";
        let (c, p) = parse_cgroup(k8s);
        assert_eq!(p.as_deref(), Some("7d9f8c6b-5a4e-4c3d-9b2a-1f0e9d8c7b6a"));
        assert_eq!(
            c.as_deref(),
            Some("aa11bb22cc33dd44ee55ff66aa11bb22cc33dd44ee55ff66aa11bb22cc33dd44")
        );
        assert_eq!(parse_cgroup("0::/user.slice\n"), (None, None));
    }

    #[test]
    fn no_driver_here_means_idle_not_error() {
        // This machine has no NVIDIA driver; a GPU machine skips the check.
        if NvmlBackend::init().is_ok() {
            return;
        }
        let ctx = BuildContext {
            id: genai_collector_core::ComponentId::parse("nvml").unwrap(),
            pipeline: None,
            telemetry: Default::default(),
        };
        assert!(NvmlReceiverFactory
            .build(NvmlConfig::default(), &ctx)
            .is_ok());
        let required = NvmlConfig {
            required: true,
            ..Default::default()
        };
        let Err(e) = NvmlReceiverFactory.build(required, &ctx) else {
            panic!("required without a driver")
        };
        assert!(e.to_string().contains("no NVIDIA driver"), "{e}");
    }
}
