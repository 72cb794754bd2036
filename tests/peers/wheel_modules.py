"""What the page generators (vllm_page.py, sglang_page.py) share: loading an engine's metrics
code from its wheel as modules, with stand-ins for the modules it imports."""

import sys
import types
import zipfile


def open_wheel(path):
    """The wheel, and its version from the `.dist-info` directory's name."""
    wheel = zipfile.ZipFile(path)
    version = next(
        n.split("/")[0].removesuffix(".dist-info").split("-")[1]
        for n in wheel.namelist()
        if n.endswith(".dist-info/METADATA")
    )
    return wheel, version


def module(name, cls=types.ModuleType, **attrs):
    """A module registered under `name` (and its parents), with `attrs`."""
    m = cls(name)
    m.__dict__.update(attrs)
    m.__path__ = []
    sys.modules[name] = m
    parent, _, child = name.rpartition(".")
    if parent:
        if parent not in sys.modules:
            module(parent)
        setattr(sys.modules[parent], child, m)
    return m


def load(wheel, path):
    """Executes a file of the wheel, unchanged, as the module its path names."""
    m = module(path[:-3].replace("/", "."))
    m.__file__ = path
    exec(compile(wheel.read(path).decode(), path, "exec"), m.__dict__)
    return m
