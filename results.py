"""The results file (one JSON object per line), the runs' own record files beside it, and wandb logging.

Appends take a file lock and replace the whole file atomically, so a killed run never leaves a
partial line and two processes never interleave. Where file locks cannot be trusted (cluster tasks
on a network file system mounted without locking), each run writes its record to a file of its own,
<results>.d/<key>.jsonl, atomically; `read` merges that folder into the file's records. A run's key
is a hash of the config that defines it, which is how a restarted driver knows what is already done.

JSON has no inf or NaN, yet a run may legitimately hold them (alpha = inf selects nothing). Such a
value is written as null, and the record gains a top-level "nonfinite" object that maps the value's
JSON pointer to its text, e.g. {"config": {"alpha": null}, "nonfinite": {"/config/alpha": "inf"}}.
`read` puts the numbers back; any other JSON reader sees null, a missing value.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from filelock import FileLock, Timeout

from common import UserError, atomic_write_bytes, check_output_dir, check_output_file

def run_key(config: dict, defining: tuple[str, ...]) -> str:
    """A stable hash of the fields of `config` that define the run (runner.COMMON_KEY plus the method's
    own hyperparameters); a field the config lacks counts as None."""
    picked = {k: config.get(k) for k in defining}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:20]


WANDB_MODES = ("auto", "online", "offline", "disabled")


def _lock(path: Path) -> FileLock:
    return FileLock(str(path) + ".lock")


def record_dir(path: str | Path) -> Path:
    """The folder of the runs' own record files beside the results file `path`."""
    return Path(str(path) + ".d")


def examples_path(path: str | Path, key: str) -> Path:
    """The per-example side file of run `key` beside the results file `path` (metrics.evaluate's
    per_example arrays: phi and indices of the forget set and its unseen counterpart)."""
    return Path(str(path) + ".examples") / f"{key}.npz"


def save_examples(path: str | Path, key: str, arrays: dict) -> Path:
    """Write the run's per-example arrays atomically (float32 phi, int indices; a few KiB)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    out = examples_path(path, key)
    atomic_write_bytes(out, buf.getvalue())
    return out


def load_examples(path: str | Path, key: str) -> dict | None:
    """The run's per-example arrays, or None when it has no side file."""
    import numpy as np

    file = examples_path(path, key)
    if not file.is_file():
        return None
    with np.load(file) as z:
        return {k: z[k] for k in z.files}


def read(path: str | Path) -> list[dict]:
    """All records: the file's lines, then the record files in record_dir(path) by name. A damaged line
    or file is skipped with a warning, the rest is kept."""
    path = Path(path)
    files = ([path] if path.is_file() else []) + sorted(record_dir(path).glob("*.jsonl"))
    records = []
    for file in files:
        try:
            lines = file.read_bytes().splitlines()
        except OSError as e:  # e.g. a record file that another task is replacing right now
            print(f"warning: cannot read {file} ({e.strerror}); skipping it", file=sys.stderr)
            continue
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(restore_nonfinite(json.loads(line)))
            except ValueError:  # bad JSON or bytes that are not UTF-8
                print(f"warning: {file}:{i} is not valid JSON; skipping that line", file=sys.stderr)
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


def find(path: str | Path, key: str, key_of=None) -> dict | None:
    """The last record whose stored key, or whose key recomputed by `key_of(config)`, is `key`."""
    found = None
    for r in read(path):
        recomputed = key_of(r["config"]) if key_of is not None and isinstance(r.get("config"), dict) else None
        if key in (r.get("key"), recomputed):
            found = r
    return found


def _pointer_part(key) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _strip_nonfinite(obj, pointer: str, found: dict):
    if isinstance(obj, float) and not math.isfinite(obj):
        found[pointer] = str(obj)  # 'inf', '-inf' or 'nan': float() reads each back
        return None
    if isinstance(obj, dict):
        return {k: _strip_nonfinite(v, f"{pointer}/{_pointer_part(k)}", found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strip_nonfinite(v, f"{pointer}/{i}", found) for i, v in enumerate(obj)]
    return obj


def encode(record: dict, **dumps_args) -> str:
    """One results line: strict JSON, with non-finite numbers moved to "nonfinite" (see the module doc)."""
    found: dict[str, str] = {}
    clean = _strip_nonfinite(record, "", found)
    if found:
        clean["nonfinite"] = found
    return json.dumps(clean, sort_keys=True, allow_nan=False, **dumps_args) + "\n"


def restore_nonfinite(record):
    """The inverse of `encode`: put each value named in "nonfinite" back in its place."""
    if not isinstance(record, dict) or not isinstance(record.get("nonfinite"), dict):
        return record
    record = dict(record)
    for pointer, text in record.pop("nonfinite").items():
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]] or [None]
        node = record
        try:
            for p in parents:
                node = node[int(p) if isinstance(node, list) else p]
            node[int(last) if isinstance(node, list) else last] = float(text)
        except (KeyError, IndexError, TypeError, ValueError):
            print(f"warning: cannot restore the non-finite value at {pointer}; it stays null", file=sys.stderr)
    return record


LOCK_WAIT_S = 30  # how long a run waits, before it starts, for another process's append to finish


def check_writable(path: str | Path, separate: bool = False) -> None:
    """Before a run: the results file can be appended to, its lock taken and its claims folder made; or,
    for a `separate` record, its record folder made."""
    path = Path(path)
    check_output_file(path, "--results")
    if separate:
        check_output_dir(record_dir(path), "--results")
        return
    check_output_dir(Path(str(path) + ".claims"), "--results")
    lock_file = Path(str(path) + ".lock")
    if lock_file.exists():  # a lock that does not exist yet is created in the folder checked above
        try:
            with _lock(path).acquire(timeout=LOCK_WAIT_S):
                pass
        except Timeout:
            raise UserError(f"the lock {lock_file} has been held for {LOCK_WAIT_S} s (wait for the process "
                            f"that writes {path}, or delete the lock file if none does)") from None
        except OSError as e:
            raise UserError(f"cannot take the lock {lock_file} ({e.strerror or type(e).__name__}) "
                            f"(fix its permissions, or delete it if no process writes {path})") from None


def save_fallback(record: dict, path: str | Path) -> Path | None:
    """Keep a record whose results line could not be written: one line in a file of its own, beside the
    results file, else in runs/logs, else in the temporary folder. Returns where, or None."""
    name = f"unsaved-{record.get('key', 'run')}.jsonl"
    line = encode(record, default=str).encode()  # default=str: even an odd value must not lose the rest
    for folder in (Path(path).parent, Path("runs/logs"), Path(tempfile.gettempdir())):
        try:
            atomic_write_bytes(folder / name, line)
            return folder / name
        except OSError:
            continue
    return None


def append(path: str | Path, record: dict) -> None:
    """Add one line under the lock; the old content is rewritten with the new line, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = encode(record)
    with _lock(path):
        old = path.read_bytes() if path.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"  # never glue a new record onto a damaged last line
        atomic_write_bytes(path, old + line.encode())


def write_record(path: str | Path, record: dict) -> Path:
    """One record in a file of its own, record_dir(path)/<key>.jsonl, written atomically and without a
    lock: a task that runs the same key again writes the same name, so no record is ever doubled."""
    out = record_dir(path) / f"{record['key']}.jsonl"
    atomic_write_bytes(out, encode(record).encode())
    return out


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
