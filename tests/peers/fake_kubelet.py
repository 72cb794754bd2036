"""The kubelet's pod-resources API on a unix socket, as a device monitoring agent sees it: grpcio
serving v1.PodResourcesLister/List, messages built by the protobuf library from
tests/fixtures/kubelet/podresources-v1.proto (compiled at start by grpc_proto.py).

    python fake_kubelet.py --socket /tmp/x/kubelet.sock --allocations pods.json

pods.json, re-read on every List so a test can move devices between pods:
    [{"namespace": "inference", "pod": "vllm-0",
      "containers": [{"name": "vllm", "devices": [{"resource_name": "nvidia.com/gpu",
                                                   "device_ids": ["GPU-..."]}]}]}]
Prints "ready" once serving. Stops on SIGTERM or SIGINT.
"""
import argparse
import json
import signal
import sys
import threading
from concurrent import futures

import grpc
from grpc_proto import compile_proto


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--allocations", required=True)
    args = parser.parse_args()
    pb, pb_grpc = compile_proto("kubelet", "podresources-v1.proto")

    class Lister(pb_grpc.PodResourcesListerServicer):
        def List(self, request, context):
            with open(args.allocations) as f:
                pods = json.load(f)
            reply = pb.ListPodResourcesResponse()
            for p in pods:
                pod = reply.pod_resources.add(name=p["pod"], namespace=p["namespace"])
                for c in p["containers"]:
                    container = pod.containers.add(name=c["name"])
                    for d in c["devices"]:
                        container.devices.add(resource_name=d["resource_name"],
                                              device_ids=d["device_ids"])
            return reply

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_PodResourcesListerServicer_to_server(Lister(), server)
    server.add_insecure_port(f"unix:{args.socket}")
    server.start()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(0)


if __name__ == "__main__":
    main()
