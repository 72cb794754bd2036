"""Plays KEDA against an external scaler: a grpcio client of externalscaler.ExternalScaler, its
messages built by the protobuf library from tests/fixtures/keda/externalscaler.proto (compiled
at start by grpc_proto.py), as KEDA's scaler calls it for a ScaledObject's trigger.

    python keda_client.py --address 127.0.0.1:6000 [--token T] [--ca ca.pem [--cert c.pem --key k.pem]]

Reads one JSON call per line on stdin and answers one JSON line on stdout:
    {"call": "GetMetricSpec", "metadata": {"pool": "chat", "signal": "waiting_per_server", "target": "5"}}
    -> {"specs": [{"name": "...", "target": 5.0}]}
    {"call": "GetMetrics", "metadata": {...}, "metric_name": "s0-waiting-per-server-pool-chat"}
    -> {"values": [{"name": "...", "value": 30.0}]}
    {"call": "IsActive", "metadata": {...}}                  -> {"active": true}
    {"call": "StreamIsActive", "metadata": {...}, "count": 2, "timeout": 10}
    -> {"stream": [true, false]}   (the first `count` answers, or those within `timeout` s)
    {"call": "OpenStreams", "metadata": {...}, "count": 1000}  -> {"open": 1000, "errors": {}}
    {"call": "CloseStreams"}                                   -> {"closed": 1000}
An error answers {"error": "UNAVAILABLE", "details": "..."}. Prints "ready" first.
"""
import argparse
import json
import sys

import grpc
from grpc_proto import compile_proto


def call(stub, pb, req):
    ref = pb.ScaledObjectRef(name="vllm-chat", namespace="inference",
                             scalerMetadata=req.get("metadata", {}))
    kind = req["call"]
    if kind == "GetMetricSpec":
        r = stub.GetMetricSpec(ref, timeout=5)
        return {"specs": [{"name": s.metricName, "target": s.targetSizeFloat,
                           "target_int": s.targetSize} for s in r.metricSpecs]}
    if kind == "GetMetrics":
        r = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref,
                                                 metricName=req.get("metric_name", "")),
                            timeout=5)
        return {"values": [{"name": v.metricName, "value": v.metricValueFloat,
                            "value_int": v.metricValue} for v in r.metricValues]}
    if kind == "IsActive":
        return {"active": stub.IsActive(ref, timeout=5).result}
    if kind == "StreamIsActive":
        seen = []
        try:
            for r in stub.StreamIsActive(ref, timeout=req.get("timeout", 10)):
                seen.append(r.result)
                if len(seen) >= req.get("count", 1):
                    break
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        return {"stream": seen}
    if kind == "OpenStreams":
        # `count` StreamIsActive streams held open at once (100 per connection, as many
        # KEDA operators would), each read to its first answer; `close` ends them all.
        opened = []
        ok, errors = 0, {}
        for i in range(req["count"]):
            if i % 100 == 0:
                extra = pb_grpc_module.ExternalScalerStub(make_channel(ARGS))
            call_ = extra.StreamIsActive(ref, timeout=60)
            try:
                next(call_)
                ok += 1
                opened.append(call_)
            except grpc.RpcError as e:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1
        HELD.extend(opened)
        return {"open": ok, "errors": errors}
    if kind == "CloseStreams":
        for c in HELD:
            c.cancel()
        n = len(HELD)
        HELD.clear()
        return {"closed": n}
    if kind == "StreamMetricSpec":
        return {"specs": [[s.metricName for s in r.metricSpecs]
                          for r in stub.StreamMetricSpec(ref, timeout=5)]}
    return {"error": "BAD_CALL", "details": kind}


HELD = []
ARGS = None
pb_grpc_module = None


def make_channel(args):
    """Plaintext, or TLS with KEDA's caCert (and tlsClientCert/tlsClientKey for mutual TLS)."""
    if args.ca:
        read = lambda path: open(path, "rb").read() if path else None
        creds = grpc.ssl_channel_credentials(read(args.ca), read(args.key), read(args.cert))
        channel = grpc.secure_channel(args.address, creds)
    else:
        channel = grpc.insecure_channel(args.address)
    if args.token:
        channel = grpc.intercept_channel(channel, BearerInterceptor(args.token))
    return channel


def main():
    global ARGS, pb_grpc_module
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--token")
    parser.add_argument("--ca")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    pb, pb_grpc = compile_proto("keda", "externalscaler.proto")
    ARGS, pb_grpc_module = args, pb_grpc
    stub = pb_grpc.ExternalScalerStub(make_channel(args))
    print("ready", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            out = call(stub, pb, json.loads(line))
        except grpc.RpcError as e:
            out = {"error": e.code().name, "details": e.details()}
        print(json.dumps(out), flush=True)


class BearerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token):
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        metadata = list(details.metadata or []) + [self.header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)


if __name__ == "__main__":
    main()
