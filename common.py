"""Small things every module needs: the user-error type, seeding, atomic writes, hashing."""
from __future__ import annotations

import argparse
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
    import sklearn
    import torch
    import torchvision
    import transformers

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "transformers": transformers.__version__, "sklearn": sklearn.__version__,
            "numpy": np.__version__}


def git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks (usage examples) and shows each default once: not when the
    help already speaks of its default, and not for None or a switch that is off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if ("default" in help or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return help
        return help + " (default: %(default)s)"


# Flags that several entry points share: declared here once, added with add_shared_flags.
SHARED_FLAGS = {
    "net": (("--net", "-net"), dict(default="resnet18", help="architecture (resnet18 or vit)")),
    "dataset": (("--dataset", "-dataset"), dict(default="digits", help="dataset (digits and digits5 are embedded "
                                                                         "and need no download)")),
    "seed": (("--seed", "-seed"), dict(type=int, default=0, help="seeds python, numpy and torch")),
    "device": (("--device",), dict(default="auto", help="auto, cpu, cuda or cuda:N")),
    "amp": (("--amp",), dict(action="store_true", help="bf16 autocast in importances, training and evaluation")),
    "deterministic": (("--deterministic",), dict(
        action="store_true", help="deterministic kernels (cuDNN, cuBLAS, torch's deterministic mode): GPU reruns "
                                  "repeat bit for bit, more slowly; ops without a deterministic kernel warn")),
    "checkpoint_dir": (("--checkpoint-dir",), dict(default="runs/pretrain",
                                                    help="folder of the original models, one sub-folder each")),
    "data_dir": (("--data-dir",), dict(default="data", help="root folder of the datasets (CIFAR is downloaded "
                                                            "there if missing)")),
    "no_download": (("--no-download",), dict(action="store_true", help="never try to download a missing dataset")),
    "results": (("--results",), dict(default="runs/results.jsonl", help="JSON-lines results file, one line per run")),
}


def add_shared_flags(parser: argparse.ArgumentParser, *names: str, **defaults) -> None:
    """Add the named shared flags; keyword arguments override a flag's default (or help, as `<name>_help`)."""
    import datasets
    import models

    choices = {"net": models.NETS, "dataset": datasets.DATASETS}
    for name in names:
        flags, kwargs = SHARED_FLAGS[name]
        kwargs = {**kwargs, **({"choices": choices[name]} if name in choices else {})}
        if name in defaults:
            kwargs["default"] = defaults[name]
        if f"{name}_help" in defaults:
            kwargs["help"] = defaults[f"{name}_help"]
        parser.add_argument(*flags, **kwargs)


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
