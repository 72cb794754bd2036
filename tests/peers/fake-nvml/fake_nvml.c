/* A stand-in libnvidia-ml.so.1 for machines without an NVIDIA driver, so the collector's real NVML
 * code path (dlopen, symbols, structs) runs in the bars. H100-like readings that move with time:
 * utilization follows a 60 s sine, power follows utilization, the energy counter integrates power.
 * Environment: FAKE_NVML_GPUS (default 2); FAKE_NVML_PROCS "gpu:pid:bytes,..." (compute processes);
 * FAKE_NVML_ROW_REMAP "gpu:pending,gpu:failed,..." (row-remapper state, read on every call);
 * FAKE_NVML_XID "gpu:xid@seconds,..." (a critical XID error each, delivered once to an event
 * set the GPU is registered with, `seconds` after nvmlInit_v2); FAKE_NVML_PROC_SM "pid:percent,..."
 * (per-process SM utilisation of the processes in FAKE_NVML_PROCS; unset: not supported).
 * Build: gcc -O2 -shared -fPIC -o libnvidia-ml.so.1 fake_nvml.c -lm */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int ret_t;
enum { OK = 0, UNINIT = 1, INVALID = 2, NOT_SUPPORTED = 3, NOT_FOUND = 6, INSUFFICIENT = 7, TIMEOUT = 10 };
typedef struct dev { unsigned idx; } dev_t_;
typedef dev_t_ *nvmlDevice_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } mem_v2_t;
typedef struct { unsigned long long total, free, used; } mem_t;
typedef struct { unsigned gpu, memory; } util_t;
typedef struct { unsigned pid; unsigned long long used; unsigned gi, ci; } proc_t;

static dev_t_ devs[16];
static int inited;
static double t0;
static const unsigned long long TOTAL = 85899345920ULL; /* 80 GiB */

static double now(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + ts.tv_nsec / 1e9; }
static unsigned ngpus(void) { const char *e = getenv("FAKE_NVML_GPUS"); unsigned n = e ? (unsigned)atoi(e) : 2; return n > 16 ? 16 : n; }
static double util(unsigned i) { double t = now() - t0; return 50.0 + 45.0 * sin(t * 2 * M_PI / 60.0 + i); }
static double watts(unsigned i) { return 70.0 + 6.3 * util(i); } /* 70 W idle .. ~700 W */
static int valid(nvmlDevice_t d) { return inited && d && d >= devs && d < devs + ngpus(); }

ret_t nvmlInit_v2(void) { if (!inited) { t0 = now(); for (unsigned i = 0; i < 16; i++) devs[i].idx = i; } inited = 1; return OK; }
ret_t nvmlInitWithFlags(unsigned f) { (void)f; return nvmlInit_v2(); }
ret_t nvmlShutdown(void) { inited = 0; return OK; }
const char *nvmlErrorString(ret_t r) { return r == OK ? "Success" : r == NOT_SUPPORTED ? "Not Supported" : "Fake NVML error"; }
ret_t nvmlSystemGetDriverVersion(char *v, unsigned n) { snprintf(v, n, "550.90.07"); return OK; }
ret_t nvmlSystemGetNVMLVersion(char *v, unsigned n) { snprintf(v, n, "12.550.90.07"); return OK; }
ret_t nvmlSystemGetCudaDriverVersion_v2(int *v) { *v = 12040; return OK; }
ret_t nvmlGetExcludedDeviceCount(unsigned *c) { *c = 0; return OK; }
ret_t nvmlDeviceGetCount_v2(unsigned *c) { if (!inited) return UNINIT; *c = ngpus(); return OK; }
ret_t nvmlDeviceGetHandleByIndex_v2(unsigned i, nvmlDevice_t *d) { if (!inited) return UNINIT; if (i >= ngpus()) return INVALID; *d = &devs[i]; return OK; }
ret_t nvmlDeviceGetIndex(nvmlDevice_t d, unsigned *i) { if (!valid(d)) return INVALID; *i = d->idx; return OK; }
ret_t nvmlDeviceGetUUID(nvmlDevice_t d, char *u, unsigned n) { if (!valid(d)) return INVALID; snprintf(u, n, "GPU-fa4e0000-0000-4000-8000-%012u", d->idx); return OK; }
ret_t nvmlDeviceGetName(nvmlDevice_t d, char *s, unsigned n) { if (!valid(d)) return INVALID; snprintf(s, n, "NVIDIA H100 80GB HBM3"); return OK; }
ret_t nvmlDeviceGetSerial(nvmlDevice_t d, char *s, unsigned n) { if (!valid(d)) return INVALID; snprintf(s, n, "165000000%04u", d->idx); return OK; }
ret_t nvmlDeviceGetVbiosVersion(nvmlDevice_t d, char *s, unsigned n) { if (!valid(d)) return INVALID; snprintf(s, n, "96.00.99.00.01"); return OK; }
static unsigned long long used_bytes(unsigned i) { return (unsigned long long)(TOTAL * (0.30 + 0.5 * util(i) / 100.0)); }
ret_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, mem_v2_t *m) {
  if (!valid(d)) return INVALID;
  m->total = TOTAL; m->reserved = 567279616ULL; m->used = used_bytes(d->idx); m->free = TOTAL - m->reserved - m->used; return OK;
}
ret_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, mem_t *m) {
  if (!valid(d)) return INVALID;
  m->total = TOTAL; m->used = used_bytes(d->idx) + 567279616ULL; m->free = TOTAL - m->used; return OK;
}
ret_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, util_t *u) { if (!valid(d)) return INVALID; u->gpu = (unsigned)util(d->idx); u->memory = (unsigned)(util(d->idx) / 2); return OK; }
ret_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned *t) { if (!valid(d) || sensor != 0) return INVALID; *t = (unsigned)(30 + util(d->idx) / 3); return OK; }
ret_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned *mw) { if (!valid(d)) return INVALID; *mw = (unsigned)(watts(d->idx) * 1000); return OK; }
ret_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t d, unsigned *mw) { if (!valid(d)) return INVALID; *mw = 700000; return OK; }
ret_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t d, unsigned *mw) { return nvmlDeviceGetEnforcedPowerLimit(d, mw); }
ret_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t d, unsigned long long *mj) {
  if (!valid(d)) return INVALID;
  /* integral of 70 + 6.3*(50 + 45 sin(wt+i)) W over [t0, now] */
  double t = now() - t0, w = 2 * M_PI / 60.0;
  double j = (70.0 + 315.0) * t + 6.3 * 45.0 * (cos(d->idx) - cos(w * t + d->idx)) / w;
  *mj = 1000000000ULL + (unsigned long long)(j * 1000.0); return OK;
}
ret_t nvmlDeviceGetClockInfo(nvmlDevice_t d, int type, unsigned *mhz) { if (!valid(d)) return INVALID; *mhz = type == 2 ? 2619 : type == 1 ? 1755 : 1980; return OK; }
ret_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t d, int kind, int counter, unsigned long long *c) { if (!valid(d)) return INVALID; (void)counter; *c = kind == 0 ? 3 : 0; return OK; }
ret_t nvmlDeviceGetPcieThroughput(nvmlDevice_t d, int counter, unsigned *kbs) { if (!valid(d)) return INVALID; *kbs = counter == 0 ? 1200 : 34000; return OK; }
ret_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t d, unsigned long long *r) { if (!valid(d)) return INVALID; *r = 0x1ULL; return OK; }
ret_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t d, unsigned long long *r) { return nvmlDeviceGetCurrentClocksThrottleReasons(d, r); }
ret_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned *cur, unsigned *pend) { (void)cur; (void)pend; return valid(d) ? NOT_SUPPORTED : INVALID; }
ret_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t d, unsigned i, nvmlDevice_t *m) { (void)i; (void)m; return valid(d) ? NOT_SUPPORTED : INVALID; }
ret_t nvmlDeviceGetFanSpeed(nvmlDevice_t d, unsigned *s) { (void)s; return valid(d) ? NOT_SUPPORTED : INVALID; }

/* Video engines: the encoder idle, the decoder at a steady 7 %. */
ret_t nvmlDeviceGetEncoderUtilization(nvmlDevice_t d, unsigned *u, unsigned *period_us) { if (!valid(d)) return INVALID; *u = 0; *period_us = 167000; return OK; }
ret_t nvmlDeviceGetDecoderUtilization(nvmlDevice_t d, unsigned *u, unsigned *period_us) { if (!valid(d)) return INVALID; *u = 7; *period_us = 167000; return OK; }
/* Hopper has row remapping, not page retirement. */
ret_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t d, int *state) { (void)state; return valid(d) ? NOT_SUPPORTED : INVALID; }
ret_t nvmlDeviceGetRemappedRows(nvmlDevice_t d, unsigned *corr, unsigned *unc, unsigned *pending, unsigned *failed) {
  if (!valid(d)) return INVALID;
  *corr = 0; *unc = 0; *pending = 0; *failed = 0;
  const char *e = getenv("FAKE_NVML_ROW_REMAP");
  if (e) {
    char buf[256]; snprintf(buf, sizeof buf, "%s", e);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
      unsigned g; char state[16];
      if (sscanf(tok, "%u:%15s", &g, state) == 2 && g == d->idx) {
        *unc = 1;
        if (!strcmp(state, "pending")) *pending = 1;
        if (!strcmp(state, "failed")) *failed = 1;
      }
    }
  }
  return OK;
}

/* Events: one set at a time is enough for the collector; only critical XID errors (0x8). */
typedef struct { nvmlDevice_t device; unsigned long long type, data; unsigned gi, ci; } event_t;
static int the_set, registered[16], delivered[32];
ret_t nvmlEventSetCreate(void **set) { if (!inited) return UNINIT; *set = &the_set; return OK; }
ret_t nvmlEventSetFree(void *set) { (void)set; return OK; }
ret_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t d, unsigned long long *t) { if (!valid(d)) return INVALID; *t = 0x8; return OK; }
ret_t nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long t, void *set) {
  if (!valid(d) || set != &the_set || t != 0x8) return INVALID;
  registered[d->idx] = 1; return OK;
}
ret_t nvmlEventSetWait_v2(void *set, event_t *out, unsigned timeout_ms) {
  (void)timeout_ms;
  if (set != &the_set) return INVALID;
  const char *e = getenv("FAKE_NVML_XID");
  if (!e) return TIMEOUT;
  char buf[256]; snprintf(buf, sizeof buf, "%s", e);
  int i = 0;
  for (char *tok = strtok(buf, ","); tok && i < 32; tok = strtok(NULL, ","), i++) {
    unsigned g; unsigned long long xid; double at;
    if (sscanf(tok, "%u:%llu@%lf", &g, &xid, &at) == 3 && g < ngpus() && registered[g] && !delivered[i] && now() - t0 >= at) {
      delivered[i] = 1;
      out->device = &devs[g]; out->type = 0x8; out->data = xid; out->gi = out->ci = 0xFFFFFFFF;
      return OK;
    }
  }
  return TIMEOUT;
}

ret_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned *count, proc_t *out) {
  if (!valid(d)) return INVALID;
  proc_t found[32]; unsigned n = 0;
  const char *e = getenv("FAKE_NVML_PROCS");
  if (e) {
    char buf[1024]; snprintf(buf, sizeof buf, "%s", e);
    for (char *tok = strtok(buf, ","); tok && n < 32; tok = strtok(NULL, ",")) {
      unsigned g, pid; unsigned long long bytes;
      if (sscanf(tok, "%u:%u:%llu", &g, &pid, &bytes) == 3 && g == d->idx) { found[n].pid = pid; found[n].used = bytes; found[n].gi = found[n].ci = 0xFFFFFFFF; n++; }
    }
  }
  if (!out || *count < n) { *count = n; return n ? INSUFFICIENT : OK; }
  memcpy(out, found, n * sizeof(proc_t)); *count = n; return OK;
}
ret_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t d, unsigned *count, proc_t *out) { (void)out; if (!valid(d)) return INVALID; *count = 0; return OK; }

typedef struct { unsigned pid; unsigned long long ts; unsigned sm, mem, enc, dec; } psample_t;
ret_t nvmlDeviceGetProcessUtilization(nvmlDevice_t d, psample_t *out, unsigned *count, unsigned long long last) {
  (void)last;
  if (!valid(d)) return INVALID;
  const char *sm = getenv("FAKE_NVML_PROC_SM");
  if (!sm) return NOT_SUPPORTED;
  proc_t procs[32]; unsigned n = 32;
  if (nvmlDeviceGetComputeRunningProcesses_v3(d, &n, procs) != OK) n = 0;
  psample_t found[32]; unsigned m = 0;
  for (unsigned i = 0; i < n; i++) {
    unsigned pct = 0; char buf[1024]; snprintf(buf, sizeof buf, "%s", sm);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
      unsigned pid, p;
      if (sscanf(tok, "%u:%u", &pid, &p) == 2 && pid == procs[i].pid) pct = p;
    }
    found[m].pid = procs[i].pid; found[m].ts = (unsigned long long)(now() * 1e6);
    found[m].sm = pct; found[m].mem = found[m].enc = found[m].dec = 0; m++;
  }
  if (!out || *count < m) { *count = m; return m ? INSUFFICIENT : OK; }
  memcpy(out, found, m * sizeof(psample_t)); *count = m; return OK;
}
