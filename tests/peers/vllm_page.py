"""A vLLM `/metrics` page produced by vLLM's own metrics code, without a GPU.

Loads `vllm/v1/metrics/{loggers,stats,buckets,utils,prometheus,cache_hit_source}.py` and
`vllm/v1/spec_decode/metrics.py` from a downloaded vLLM wheel, unchanged, with the heavy
modules they import (torch, the engine, the config classes) replaced by small stand-ins; the
two classes it needs from modules that import torch (`FinishReason`, `PerfMetricsProm`) are
taken from the wheel's source by name. `PrometheusStatLogger` is then driven with the stats
objects the engine would hand it (`SchedulerStats`, `IterationStats`, `FinishedRequestStats`,
`SpecDecodingStats`) for a few requests, and the page is `prometheus_client`'s exposition.

    pip download vllm --no-deps -d /tmp/vllm
    pip install prometheus_client==0.26.0 numpy
    python tests/peers/vllm_page.py /tmp/vllm/vllm-*.whl > tests/fixtures/vllm/<version>-loggers.prom
"""

import ast
import enum
import logging
import sys
import types
from dataclasses import dataclass, field

from wheel_modules import load, module, open_wheel

WHEEL = sys.argv[1]
FILES = [
    "vllm/v1/metrics/cache_hit_source.py",
    "vllm/v1/metrics/buckets.py",
    "vllm/v1/metrics/utils.py",
    "vllm/v1/metrics/prometheus.py",
    "vllm/v1/spec_decode/metrics.py",
    "vllm/v1/metrics/stats.py",
    "vllm/v1/metrics/loggers.py",
]

wheel, version = open_wheel(WHEEL)


def classes_from(path, names, namespace):
    """Executes only the named top-level classes and constants of a wheel file in `namespace`."""

    def named(node):
        if isinstance(node, ast.ClassDef):
            return node.name in names
        return isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in names for t in node.targets
        )

    tree = ast.parse(wheel.read(path).decode())
    body = [n for n in tree.body if named(n)]
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), namespace)
    return [namespace[n] for n in names]


class Anything:
    """Stands in for config objects and classes the page does not depend on."""

    def __init__(self, *a, **k):
        pass

    def __getattr__(self, _):
        return None

    def observe(self, *a, **k):
        pass


class Envs(types.ModuleType):
    def __getattr__(self, name):
        return False


sys.modules["vllm.envs"] = Envs("vllm.envs")
module("vllm", envs=sys.modules["vllm.envs"])
module("vllm.logger", init_logger=logging.getLogger)
module("vllm.plugins", STAT_LOGGER_PLUGINS_GROUP="vllm.stat_logger_plugins",
       load_plugins_by_group=lambda group: {})
module("vllm.compilation.cuda_graph", CUDAGraphLogging=Anything, CUDAGraphStat=Anything)
module("vllm.config", SupportsMetricsInfo=object, VllmConfig=object, SpeculativeConfig=object)
module("vllm.distributed.kv_transfer.kv_connector.v1.metrics",
       KVConnectorLogging=Anything, KVConnectorProm=Anything)
module("vllm.distributed.ec_transfer.ec_connector.metrics",
       ECConnectorLogging=Anything, ECConnectorProm=Anything)
module("vllm.v1.metrics")
module("vllm.v1.spec_decode")

import prometheus_client  # noqa: E402

# Classes from modules that import torch: taken from the wheel by name.
FinishReason, _ = classes_from(
    "vllm/v1/engine/__init__.py", ["FinishReason", "FINISH_REASON_STRINGS"], {"enum": enum}
)
module("vllm.v1.engine", FinishReason=FinishReason)
perf_ns = {"prometheus_client": prometheus_client}
module("vllm.v1.metrics.perf", PerfStats=object, PerfMetricsLogging=Anything)
for path in FILES:
    if path == "vllm/v1/metrics/loggers.py":
        # utils is loaded by now: PerfMetricsProm needs its create_metric_per_engine.
        perf_ns["create_metric_per_engine"] = sys.modules["vllm.v1.metrics.utils"].create_metric_per_engine
        perf_ns.update(VllmConfig=object, PerfStats=object)
        (PerfMetricsProm,) = classes_from("vllm/v1/metrics/perf.py", ["PerfMetricsProm"], perf_ns)
        sys.modules["vllm.v1.metrics.perf"].PerfMetricsProm = PerfMetricsProm
    load(wheel, path)

loggers = sys.modules["vllm.v1.metrics.loggers"]
stats = sys.modules["vllm.v1.metrics.stats"]
spec = sys.modules["vllm.v1.spec_decode.metrics"]


@dataclass
class CacheConfig:
    """`metrics_info()` as vLLM's CacheConfig gives it: every field as a string label."""

    block_size: int = 16
    num_gpu_blocks: int = 27_000
    num_cpu_blocks: int = 0
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    cache_dtype: str = "auto"

    def metrics_info(self):
        return {k: str(v) for k, v in self.__dict__.items()}


ns = types.SimpleNamespace
config = ns(
    observability_config=ns(
        show_hidden_metrics=False,
        kv_cache_metrics=False,
        custom_histogram_buckets=None,
        enable_mfu_metrics=False,
        cudagraph_metrics=False,
    ),
    model_config=ns(served_model_name="meta-llama/Llama-3.1-8B-Instruct",
                    max_model_len=8192, is_diffusion=False),
    speculative_config=ns(num_speculative_tokens=3),
    kv_transfer_config=None,
    ec_transfer_config=None,
    watermark_config=None,
    lora_config=ns(max_loras=4),
    cache_config=CacheConfig(),
    scheduler_config=ns(max_num_seqs=256, max_num_batched_tokens=8192),
    parallel_config=ns(data_parallel_size=1),
)

logger = loggers.PrometheusStatLogger(config, engine_indexes=[0])
logger.log_engine_initialized()

# A few seconds of a busy server: 12 requests finished (stop, length, abort), 5 running,
# 3 waiting for KV capacity and 1 deferred, prefix-cache hits, a preemption, speculative drafts.
for step in range(3):
    sched = stats.SchedulerStats(
        num_running_reqs=5,
        num_waiting_reqs=3,
        num_skipped_waiting_reqs=1,
        kv_cache_usage=0.62,
        running_lora_adapters={"sql-lora": 2},
        waiting_lora_adapters={},
    )
    sched.prefix_cache_stats.queries = 4096
    sched.prefix_cache_stats.hits = 1536
    sd = spec.SpecDecodingStats.new(3)
    for drafted, accepted in [(3, 2), (3, 3), (3, 0)]:
        sd.observe_draft(drafted, accepted)
    sched.spec_decoding_stats = sd
    it = stats.IterationStats()
    it.num_generation_tokens = 180
    it.prompt_token_stats.computed = 2560
    it.prompt_token_stats.local_cache_hit = 1536
    it.prompt_token_stats.cached_tokens = 1536
    it.prompt_token_stats.total = 4096
    it.num_preempted_reqs = 1 if step == 1 else 0
    it.time_to_first_tokens_iter = [0.21, 0.35, 0.48]
    it.inter_token_latencies_iter = [0.021, 0.024, 0.019, 0.030]
    it.max_num_generation_tokens_iter = [256, 512]
    it.n_params_iter = [1, 1]
    for i, reason in enumerate([FinishReason.STOP, FinishReason.STOP, FinishReason.LENGTH,
                                FinishReason.ABORT]):
        it.finished_requests.append(stats.FinishedRequestStats(
            finish_reason=reason,
            e2e_latency=2.5 + i,
            num_prompt_tokens=1024 + 100 * i,
            num_generation_tokens=120 + 10 * i,
            max_tokens_param=512,
            queued_time=0.05 * (i + 1),
            prefill_time=0.2 + 0.05 * i,
            inference_time=2.3 + i,
            decode_time=2.1 + i,
            mean_time_per_output_token=0.018 + 0.001 * i,
            num_preemptions=1 if (step, i) == (1, 0) else 0,
            num_cached_tokens=512,
        ))
    logger.record(sched, it, engine_idx=0)

sys.stdout.write(f"# vLLM {version}: PrometheusStatLogger from the wheel, driven by tests/peers/vllm_page.py\n")
sys.stdout.write(prometheus_client.generate_latest(prometheus_client.REGISTRY).decode())
