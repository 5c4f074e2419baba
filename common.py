"""Small things every module needs: the user-error type, seeding, atomic writes, hashing."""
from __future__ import annotations

import hashlib
import json
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

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
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


def run_cli(main, *args) -> None:
    """Run a script's main: a UserError becomes `error: ...` and exit status 2, never a traceback."""
    import sys

    try:
        code = main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; results and checkpoints hold only completed work", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
