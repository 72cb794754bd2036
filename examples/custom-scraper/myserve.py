"""A stand-in for a team's own Python serving stack: its /metrics page, as prometheus_client
serves it, with the team's names. Values come from the command line so a test knows them.

    python myserve.py PORT
"""

import sys
import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

port = int(sys.argv[1])
model = "acme/support-bot-7b"
labels = ["model"]
Gauge("myserve_active_requests", "Requests being generated", labels).labels(model).set(12)
Gauge("myserve_queue_size", "Requests waiting for a batch slot", labels).labels(model).set(5)
Gauge("myserve_max_batch_size", "Requests one batch holds", labels).labels(model).set(32)
Gauge("myserve_kv_blocks_used", "KV-cache blocks in use", labels).labels(model).set(300)
Gauge("myserve_kv_blocks_total", "KV-cache blocks", labels).labels(model).set(1200)
latency = Histogram("myserve_request_latency_seconds", "Request latency", labels)
for v in (0.4, 1.2, 2.5):
    latency.labels(model).observe(v)
Counter("myserve_prompt_tokens", "Prompt tokens", labels).labels(model).inc(5000)
Counter("myserve_generated_tokens", "Generated tokens", labels).labels(model).inc(1500)
Gauge("myserve_gpu_memory_used_mb", "GPU memory in use, MB", ["gpu"]).labels("0").set(61440)
Gauge("myserve_gpu_utilization_percent", "GPU busy, percent", ["gpu"]).labels("0").set(87)

start_http_server(port, addr="127.0.0.1")
print(f"listening {port}", flush=True)
while True:
    time.sleep(3600)
