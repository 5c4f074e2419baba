"""The results file (one JSON object per line) and wandb logging.

Appends take a file lock and replace the whole file atomically, so a killed run never leaves a
partial line and two processes never interleave. A run's key is a hash of the config that defines
it, which is how a restarted driver knows what is already done.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

from filelock import FileLock, Timeout

from common import atomic_write_bytes

def run_key(config: dict, defining: tuple[str, ...]) -> str:
    """A stable hash of the fields of `config` that define the run (runner.COMMON_KEY plus the method's
    own hyperparameters); a field the config lacks counts as None."""
    picked = {k: config.get(k) for k in defining}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _lock(path: Path) -> FileLock:
    return FileLock(str(path) + ".lock")


def read(path: str | Path) -> list[dict]:
    """All records; a damaged line is skipped with a warning, the rest is kept."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: {path}:{i} is not valid JSON; skipping that line", file=sys.stderr)
    return records


def done_keys(path: str | Path, key_of=None) -> set[str]:
    """The stored keys, plus each record's key recomputed by `key_of(config)`, so records written under
    an earlier key rule still count as done."""
    keys = set()
    for r in read(path):
        keys.add(r.get("key"))
        if key_of is not None and isinstance(r.get("config"), dict):
            keys.add(key_of(r["config"]))
    return keys


def append(path: str | Path, record: dict) -> None:
    """Add one line under the lock; the old content is rewritten with the new line, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
    with _lock(path):
        old = path.read_bytes() if path.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"  # never glue a new record onto a damaged last line
        atomic_write_bytes(path, old + line.encode())


@contextlib.contextmanager
def claim(results_path: str | Path, key: str):
    """Hold an exclusive claim on one run while it executes; yields False if another process holds it.

    The claim is an OS file lock, so it is released even when its holder is killed."""
    claims = Path(str(results_path) + ".claims")
    claims.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(claims / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()
        with contextlib.suppress(OSError):
            os.unlink(lock.lock_file)


def wandb_mode(requested: str) -> str:
    """'auto' means online with an API key, offline without one."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def log_wandb(record: dict, project: str, group: str, name: str, mode: str, run_dir: str | Path) -> str | None:
    """One wandb run with the full config, the metrics and the times. Returns the wandb run dir."""
    mode = wandb_mode(mode)
    if mode == "disabled":
        return None
    import wandb

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, group=group, name=name, config={**record["config"], "key": record["key"]},
                     mode=mode, dir=str(run_dir), reinit="finish_previous")
    summary = {**{k: v for k, v in record["metrics"].items() if v is not None},
               **{f"time/{k}": v for k, v in record["times"].items() if v is not None}}
    run.log(summary)
    run.summary.update(summary)
    path = run.dir
    run.finish()
    return path
