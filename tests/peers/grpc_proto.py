"""Compiles a proto of tests/fixtures with grpc_tools (protoc, as a library) into a temporary
directory and imports its message and service modules: the peers that speak gRPC build their
stubs from the fixture at start, so no generated code is kept in the repository."""
import importlib
import os
import sys
import tempfile

from grpc_tools import protoc

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")


def compile_proto(folder, file):
    """(`<file>_pb2`, `<file>_pb2_grpc`) for tests/fixtures/<folder>/<file>."""
    out = tempfile.mkdtemp(prefix="proto-")
    args = ["protoc", f"-I{os.path.join(FIXTURES, folder)}", f"--python_out={out}",
            f"--grpc_python_out={out}", file]
    if protoc.main(args) != 0:
        sys.exit(f"cannot compile {file}")
    sys.path.insert(0, out)
    module = file.removesuffix(".proto").replace("-", "_")
    return (importlib.import_module(f"{module}_pb2"),
            importlib.import_module(f"{module}_pb2_grpc"))
