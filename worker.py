"""The grid on this machine: one persistent worker process per device slot (`python worker.py`).

A worker imports the suite once and then executes jobs in-process, one after the other: a run
(runner.execute: fresh seeding, a freshly loaded model and a new results line, exactly as the task
script would do it) or a script command such as pretraining. Between runs it keeps only the loaded
datasets and checkpoint weights (a runner.Cache). A worker that dies is replaced and its job reported
as failed; --isolate gives every job a new worker.
"""
from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import runner
from common import UserError

HERE = Path(__file__).resolve().parent


def device_env(slot: str, cpu_slots: int = 1) -> tuple[dict, str]:
    """The environment and the --device of a slot's runs."""
    env = dict(os.environ)
    if slot == "cpu":
        # CPU slots share the cores: without a thread cap, two runs of two threads each on two cores
        # spin against each other and run many times slower than one after the other
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cpu_slots)))
        return env, "cpu"
    env["CUDA_VISIBLE_DEVICES"] = slot
    return env, "cuda"


def describe_exit(rc: int) -> str:
    if rc >= 0:
        return f"exit {rc}"
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    hint = " (the out-of-memory killer sends SIGKILL)" if -rc == signal.SIGKILL else ""
    return f"killed by {name}{hint}"


class Worker:
    """The driver's handle on one persistent worker (`python worker.py`, see serve):
    one JSON line per job on its stdin, one JSON line per result on its stdout."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "worker.py")], cwd=HERE, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, job: dict, log: Path) -> int | None:
        """The job's exit status, as its script would have returned it; None if the worker died."""
        try:
            self.proc.stdin.write(json.dumps({**job, "log": str(log)}, default=str) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
        except OSError:  # the pipe broke: the worker is gone
            reply = ""
        if reply:
            return json.loads(reply)["rc"]
        self.proc.wait()
        return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Closing stdin ends the worker's loop."""
        self.proc.stdin.close()
        self.proc.wait()
        self.proc.stdout.close()


def run_local(args, jobs: list[tuple[str, runner.RunConfig | list[str]]]) -> list[tuple[str, str, str]]:
    """Run (label, job) pairs, one at a time per device slot; a job is a RunConfig or a script command
    ([script, flags...], e.g. pretraining). Returns the failures as (label, command, why)."""
    pending: queue.Queue = queue.Queue()
    for j in jobs:
        pending.put(j)
    failures, lock, total = [], threading.Lock(), len(jobs)
    counter = {"started": 0}
    Path(args.logs).mkdir(parents=True, exist_ok=True)

    def slot_loop(slot: str):
        env, device = device_env(slot, args.slots.count("cpu"))
        worker = None
        try:
            while True:
                try:
                    label, job = pending.get_nowait()
                except queue.Empty:
                    return
                if isinstance(job, runner.RunConfig):
                    job = replace(job, device=device)
                    message, command = {"config": job.to_dict()}, [runner.SCRIPTS[job.scenario], *job.to_argv()]
                else:
                    command = [*job, "--device", device]
                    message = {"cmd": command}
                with lock:
                    counter["started"] += 1
                    print(f"[{counter['started']}/{total}] {slot}: {label}", flush=True)
                log = Path(args.logs) / (label.replace(" ", "_").replace("/", "-") + ".log")
                log.write_text(shlex.join([sys.executable, *command]) + "\n")  # the command heads its log
                t0 = time.perf_counter()
                if worker is None or not worker.alive():
                    worker = Worker(env)
                rc = worker.run(message, log)
                why = describe_exit(rc) if rc is not None else f"worker died: {describe_exit(worker.proc.returncode)}"
                if rc is None:  # the run died with its worker; the next run gets a new one
                    with open(log, "a") as f:
                        f.write(f"\n{why}\n")
                    worker = None
                elif args.isolate:  # nothing carries over to the next run
                    worker.close()
                    worker = None
                wall = time.perf_counter() - t0
                if rc != 0:
                    with lock:
                        failures.append((label, shlex.join([sys.executable, *command]), why))
                        print(f"FAILED ({why}): {label}; see {log}", flush=True)
                else:
                    lines = log.read_text().splitlines()
                    summary = next((ln for ln in reversed(lines) if ln.startswith(("Df ", "skip:", "saved "))), "")
                    if summary:
                        print(f"    {label}: {summary} [wall {wall:.2f}s]", flush=True)
        finally:
            if worker is not None:
                worker.close()

    # daemon threads: on Ctrl-C the driver exits instead of starting the next runs, and its workers,
    # whose stdin then closes, stop too
    threads = [threading.Thread(target=slot_loop, args=(s,), daemon=True) for s in args.slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def serve() -> None:
    """The worker loop: import the suite once, then execute one job per line of stdin, in-process, with
    the job's stdout and stderr, down to the file descriptors, appended to its log. A job is a run
    ({"config": RunConfig.to_dict()}: runner.execute with the worker's Cache) or a script command
    ({"cmd": [script, flags...]}: runpy runs it as __main__, as `python <script>` would). Replies
    {"rc": status} on the original stdout, the status the script would exit with. A job that raises
    is logged and the loop goes on.

    When stdin closes, the worker exits at once, also in the middle of a run: the driver is gone, and
    an interrupted run leaves what a killed script leaves (atomic writes, released claims)."""
    import runpy
    import traceback

    cache = runner.Cache()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    console = os.dup(1), os.dup(2)
    jobs: queue.Queue = queue.Queue()

    def read_jobs():
        for line in sys.stdin:
            jobs.put(json.loads(line))
        os._exit(0)

    def run_one(job: dict) -> int:
        try:
            if "config" in job:
                runner.execute(runner.RunConfig.from_dict(job["config"]), cache)
            else:
                sys.argv = list(job["cmd"])
                runpy.run_path(sys.argv[0], run_name="__main__")
            return 0
        except UserError as e:  # as cli.run_cli reports it
            print(f"error: {e}", file=sys.stderr)
            return 2
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                return e.code or 0
            print(e.code, file=sys.stderr)
            return 1
        except Exception:
            traceback.print_exc()
            return 1

    def redirect(out: int, err: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out, 1)
        os.dup2(err, 2)

    threading.Thread(target=read_jobs, daemon=True).start()
    while True:
        job = jobs.get()
        with open(job["log"], "a") as log:
            redirect(log.fileno(), log.fileno())
            try:
                rc = run_one(job)
            finally:
                redirect(*console)
        replies.write(json.dumps({"rc": rc}) + "\n")




if __name__ == "__main__":  # started by run_local(), one per device slot
    serve()
