"""Small things every module needs: the user-error type, value ranges, seeding, atomic writes, hashing,
devices and output paths. The command-line layer is cli.py."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import numbers
import os
import random
import tempfile
from pathlib import Path

import numpy as np


class UserError(Exception):
    """A problem the user can fix. Scripts print `error: <message>` and exit with status 2."""


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def make_deterministic() -> None:
    """Ask torch for deterministic kernels (--deterministic). On CPU little changes; on CUDA it is what
    makes two runs with one seed bitwise equal, at some cost in speed.

    warn_only: an op with no deterministic kernel warns and runs instead of stopping the run."""
    # cuBLAS reads this when it creates its handle, so it must be set before the first GPU matmul
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False  # benchmarking may pick another algorithm on each run
    torch.backends.cudnn.deterministic = True


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj, path: str | Path) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def array_sha256(arr) -> str:
    """Hash of an index array, so a split can be checked without storing it."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(arr, dtype=np.int64)).tobytes()).hexdigest()[:16]


def resolve_device(name: str):
    import torch

    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def library_versions() -> dict:
    """Versions from the package metadata, so recording them imports nothing (transformers alone takes
    about 0.5 s). A module already imported gives its own __version__, which keeps torch's build tag
    (e.g. 2.14.1+cu130) that the metadata lacks."""
    import sys
    from importlib import metadata

    def version(module: str, dist: str) -> str | None:
        if module in sys.modules:
            return sys.modules[module].__version__
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"torch": version("torch", "torch"), "torchvision": version("torchvision", "torchvision"),
            "transformers": version("transformers", "transformers"), "sklearn": version("sklearn", "scikit-learn"),
            "numpy": np.__version__}


def git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --- values and their ranges ------------------------------------------------------------------------
# Every entry point checks its input here, before it loads a checkpoint or computes anything, so bad
# input costs a second and never a run.

class Number:
    """A numeric range, declared once and used wherever a value enters: as an argparse `type=` it parses
    text and checks the range; `parse` only converts text (for flags whose value is checked later, as a
    RunConfig field); `check` takes a value given in Python."""

    def __init__(self, kind: type = float, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, inf: bool = False):
        self.kind, self.low, self.high, self.low_open, self.high_open, self.inf = kind, low, high, low_open, \
            high_open, inf
        self.what = "an integer" if kind is int else "a number"
        show = (lambda v: str(int(v))) if kind is int else (lambda v: f"{v:g}")
        bounds = [f"{'>' if low_open else '>='} {show(low)}" if low is not None else "",
                  f"{'<' if high_open else '<='} {show(high)}" if high is not None else ""]
        self.description = f"{self.what} {' and '.join(b for b in bounds if b)}".strip() + (", or inf" if inf else "")
        self.__name__ = self.description  # argparse names the type in some messages

    def in_range(self, value) -> bool:
        if self.kind is float and (math.isnan(value) or math.isinf(value) and not self.inf):
            return False
        low, high = self.low, self.high
        return not (low is not None and (value <= low if self.low_open else value < low)
                    or high is not None and (value >= high if self.high_open else value > high))

    def parse(self, text: str):
        try:
            return self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.what} (pass {self.description})") from None

    def __call__(self, text: str):
        value = self.parse(text)
        if not self.in_range(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range (pass {self.description})")
        return value

    def check(self, value, name: str):
        """`value` as `kind` (an int is a float too), or a UserError naming `name`."""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            raise UserError(f"{name}: {value!r} is not {self.what} (pass {self.description})")
        if not self.in_range(value):
            raise UserError(f"{name}: {value!r} is out of range (pass {self.description})")
        return self.kind(value)


positive_int = Number(int, 1)
non_negative_int = Number(int, 0)
seed_int = Number(int, 0, 2**31 - 1)  # numpy takes seeds < 2**32, and runs derive seed + k from it
positive_float = Number(float, 0, low_open=True)
non_negative_float = Number(float, 0)
fraction = Number(float, 0, 1, low_open=True, high_open=True)  # strictly between 0 and 1


def device_string(name: str) -> str:
    """An argparse `type=` for --device: auto, cpu, cuda, cuda:N or mps, and it must exist here."""
    check_device(name)
    return name


def check_device(name: str) -> None:
    import re

    import torch

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise UserError(f"unknown device {name!r} (pass --device auto, cpu, cuda, cuda:N or mps)")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                            f"GPU(s) (use cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("device 'mps' requested but it is not available (use --device cpu)")


def check_output_dir(folder: str | Path, flag: str) -> None:
    """`folder` is a folder, or can be created, and a file can be written in it. Creates nothing."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag}: cannot use {folder} as a folder, because {existing} is a file "
                        f"(pass another path, or move that file away)")
    if existing == folder:  # a real write, which also catches read-only mounts and root-owned folders
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise UserError(f"{flag}: cannot write in {folder} ({e.strerror or type(e).__name__}) "
                            f"(pass a writable path, or fix the folder's permissions)") from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag}: cannot create {folder}, {existing} is not writable "
                        f"(pass a writable path, or fix the folder's permissions)")


def check_output_file(path: str | Path, flag: str) -> None:
    """`path` is not a folder, and its folder exists or can be created and is writable. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag}: {path} is a folder, not a file (name a file, e.g. {path / 'results.jsonl'})")
    check_output_dir(path.parent, flag)
    if path.exists() and not os.access(path, os.R_OK):
        raise UserError(f"{flag}: {path} exists but cannot be read (fix its permissions, or pass another file)")
