"""An SGLang `/metrics` page produced by SGLang's own metrics code, without a GPU.

SGLang 0.5 and later: loads `sglang/srt/observability/metrics_collector.py` (with `utils.py`,
`scheduler_stage_metrics.py` and `sglang/srt/utils/gauge_histogram.py`) from a downloaded
SGLang wheel, unchanged; what those import from the rest of SGLang (server args, the runtime
context, torch-backed helpers) is replaced by stand-ins that answer "not configured". The
scheduler's and the tokenizer's collectors are built with the labels `init_new` and
`tokenizer_metric_labels` give a single-GPU server (`tp_rank` 0, `engine_type` unified), then
driven through their own methods (`log_stats`, `observe_one_finished_request`,
`increment_realtime_tokens`, ...) for a few requests; the page is `prometheus_client`'s
exposition. Before 0.5 (`sglang/srt/metrics/collector.py`, which imports nothing of SGLang's):
that file's two collectors, driven the same way through their own methods.

    pip download sglang --no-deps -d /tmp/sglang
    pip install prometheus_client==0.26.0 msgspec
    python tests/peers/sglang_page.py /tmp/sglang/sglang-*.whl > tests/fixtures/sglang/<version>-collector.prom
"""

import enum
import sys
import types

from wheel_modules import load as load_from, module, open_wheel

WHEEL = sys.argv[1]
wheel, version = open_wheel(WHEEL)


def load(path):
    return load_from(wheel, path)


class Unset:
    """Any attribute, call or item: itself, false and empty, so every option reads "off"."""

    def __getattr__(self, _):
        return self

    def __call__(self, *a, **k):
        return self

    def __bool__(self):
        return False

    def __iter__(self):
        return iter(())

    def __getitem__(self, _):
        return self


UNSET = Unset()


class Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return UNSET




def current():
    """SGLang 0.5 and later."""
    class DisaggregationMode(enum.Enum):
        NULL = "null"

        @staticmethod
        def to_engine_type(mode):
            return "unified"


    serving = types.SimpleNamespace(
        served_model_name="meta-llama/Llama-3.1-8B-Instruct", enable_streaming_session=False
    )
    module("sglang.srt.disaggregation.utils", DisaggregationMode=DisaggregationMode)
    module("sglang.srt.model_executor.forward_batch_info", ForwardMode=enum.IntEnum("ForwardMode", "EXTEND DECODE"))
    # The one number the collectors need from the schedule options: its default in
    # sglang/srt/arg_groups/fields/schedule.py.
    schedule = types.SimpleNamespace(prefill_delayer_max_delay_passes=30,
                                     prefill_delayer_forward_passes_buckets=None,
                                     prefill_delayer_wait_seconds_buckets=None,
                                     enable_priority_scheduling=False)
    module("sglang.srt.runtime_context", Stub, get_serving=lambda: serving,
           get_schedule=lambda: schedule,
           exports_expert_balancedness_to_prometheus=lambda: False)
    module("sglang.srt.server_args", ServerArgs=object)
    module("sglang.srt.utils", get_bool_env_var=lambda name, default="false": False)
    module("sglang.srt.utils.nvtx_utils", Stub)
    module("sglang.srt.environ", Stub)
    load("sglang/srt/utils/gauge_histogram.py")
    load("sglang/srt/observability/utils.py")
    load("sglang/srt/observability/scheduler_stage_metrics.py")
    mc = load("sglang/srt/observability/metrics_collector.py")

    labels = {
        "model_name": serving.served_model_name,
        "engine_type": "unified",
        "tp_rank": 0,
        "pp_rank": 0,
        "moe_ep_rank": 0,
    }
    scheduler = mc.SchedulerMetricsCollector(labels=labels, server_args=UNSET)
    tokenizer_labels = {"model_name": serving.served_model_name, "engine_type": "unified"}
    tokenizer = mc.TokenizerMetricsCollector(server_args=UNSET, labels=tokenizer_labels)

    scheduler.emit_constants(
        max_total_num_tokens=481_000, max_total_num_tokens_swa=None, weight_memory_usage_gb=15.0,
        kv_cache_memory_usage_gb=58.7, graph_memory_usage_gb={"decode": 0.6},
        max_running_requests_under_SLO=None, page_size=1, num_pages=481_000, context_len=131_072,
        startup_available_gpu_memory_gb=78.5,
    )
    stats = mc.SchedulerStats(
        num_running_reqs=mc.QueueCount(total=24),
        num_queue_reqs=mc.QueueCount(total=6),
        gen_throughput=1830.5,
        token_usage=0.41,
        full_token_usage=0.41,
        num_used_tokens=197_210,
        kv_used_tokens=197_210,
        kv_available_tokens=240_000,
        kv_evictable_tokens=43_790,
        num_retracted_reqs=1,
        utilization=0.93,
    )
    scheduler.log_stats(stats)
    scheduler.increment_realtime_tokens(None, prefill_compute_tokens=9_800,
                                        prefill_cache_tokens=22_100, decode_tokens=5_300)
    scheduler.increment_retracted_reqs(1, 2_048, 310)
    for q in [0.02, 0.15, 0.9]:
        scheduler.observe_queue_time(q)
    for i, (prompt, out, cached) in enumerate([(1_200, 180, 800), (3_900, 420, 3_000), (640, 96, 0)]):
        tokenizer.observe_time_to_first_token(tokenizer_labels, 0.12 + 0.1 * i, stream=i != 2)
        tokenizer.observe_inter_token_latency(tokenizer_labels, 0.09, 4)
        tokenizer.observe_one_finished_request(
            tokenizer_labels, prompt_tokens=prompt, generation_tokens=out, cached_tokens=cached,
            e2e_latency=2.0 + i, has_grammar=False,
            cached_tokens_details={"device": cached, "host": 0} if cached else None,
            is_streaming=i != 2, time_per_output_token=0.021 + 0.002 * i,
        )
    tokenizer.observe_one_aborted_request(tokenizer_labels)



def before_0_5():
    """SGLang before 0.5: per-token time per output token, no cache or retraction counters."""
    mc = load("sglang/srt/metrics/collector.py")
    labels = {"model_name": "meta-llama/Llama-3.1-8B-Instruct"}
    scheduler = mc.SchedulerMetricsCollector(labels)
    scheduler.log_stats(mc.SchedulerStats(num_running_reqs=24, num_used_tokens=197_210,
                                          token_usage=0.41, gen_throughput=1830.5,
                                          num_queue_reqs=6, cache_hit_rate=0.62))
    tokenizer = mc.TokenizerMetricsCollector(labels)
    for i, (prompt, out) in enumerate([(1_200, 180), (3_900, 420), (640, 96)]):
        tokenizer.observe_time_to_first_token(0.12 + 0.1 * i)
        for _ in range(out - 1):
            tokenizer.observe_time_per_output_token(0.021 + 0.002 * i)
        tokenizer.observe_one_finished_request(prompt, out)
        tokenizer.observe_e2e_request_latency(2.0 + i)


import prometheus_client  # noqa: E402

if "sglang/srt/observability/metrics_collector.py" in wheel.namelist():
    current()
    origin = "metrics_collector.py"
else:
    before_0_5()
    origin = "metrics/collector.py"
sys.stdout.write(f"# SGLang {version}: {origin} from the wheel, driven by tests/peers/sglang_page.py\n")
sys.stdout.write(prometheus_client.generate_latest(prometheus_client.REGISTRY).decode())
