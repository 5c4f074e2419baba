"""The grid on a SLURM cluster, through submitit: the missing checkpoints as one job array, then the
forget runs that are not recorded yet as another.

A forget task executes its runs in-process, one after the other (runner.execute; with
--slurm-runs-per-job several short runs share one task's start-up and a runner.Cache), and each run
writes its record to a file of its own, <results>.d/<key>.jsonl, atomically: nothing rests on file
locks across machines, and results.read merges the folder into the results file. A task that SLURM
requeues (preemption; a timeout too, since the task is checkpointable), or that runs twice, finds its
finished runs recorded and skips them, so rerunning the driver after a crash or an `scancel`
submits only what is missing. The driver waits for each array and lists what failed, with the log
of its task: an error, an exit code, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL.

--slurm-cluster local or debug runs the same arrays on this machine without SLURM (debug: in this
process), to try the flow.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import submitit

import results
import runner
from common import UserError, non_negative_int, positive_float, positive_int

# sacct's states of a task that ended without its result
FAILED_STATES = ("BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT")


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SLURM (--slurm); resources are per array task")
    a = g.add_argument
    a("--slurm", action="store_true", help="submit the grid to SLURM as job arrays through submitit, pretraining "
                                           "first, and wait for them (the devices argument is not used)")
    a("--slurm-partition", default=None, help="partition (default: the cluster's)")
    a("--slurm-time", type=positive_int, default=120, help="time limit of a forget task, in minutes")
    a("--slurm-pretrain-time", type=positive_int, default=1440, help="time limit of a pretraining task, in minutes")
    a("--slurm-gpus", type=non_negative_int, default=1, help="GPUs per task (0: the runs use the CPU)")
    a("--slurm-cpus", type=positive_int, default=4, help="CPUs per task (also the task's OMP_NUM_THREADS)")
    a("--slurm-mem", type=positive_float, default=None, help="memory per task in GB (default: the partition's)")
    a("--slurm-parallelism", type=positive_int, default=64, help="most tasks of one array running at once")
    a("--slurm-extra", default="", help="more sbatch parameters, key=value, e.g. 'account=lab qos=high "
                                        "constraint=a100'; a key alone is a switch (exclusive)")
    a("--slurm-runs-per-job", type=positive_int, default=1,
      help="runs per forget task: several short runs share one start-up (imports, data, weights)")
    a("--slurm-folder", default="runs/slurm", help="submitit's folder: the sbatch scripts, pickles and task logs")
    a("--slurm-cluster", choices=["slurm", "local", "debug"], default="slurm",
      help="local or debug run the same arrays on this machine without SLURM (debug: in this process)")


def extra_parameters(text: str) -> dict:
    """--slurm-extra as sbatch parameters: 'account=lab exclusive' -> {'account': 'lab', 'exclusive': True}."""
    params = {}
    for item in shlex.split(text):
        key, eq, value = item.partition("=")
        if not key or eq and not value:
            raise UserError(f"--slurm-extra: {item!r} is not key=value (write e.g. 'account=lab qos=high')")
        params[key.lstrip("-")] = value if eq else True
    return params


def _executor(args, name: str, minutes: int) -> submitit.AutoExecutor:
    try:
        ex = submitit.AutoExecutor(folder=Path(args.slurm_folder) / "%j", cluster=args.slurm_cluster)
    except RuntimeError as e:  # no srun on PATH
        raise UserError(f"--slurm cannot reach SLURM: {e} (run the driver where sbatch and srun work, or try the "
                        f"flow here with --slurm-cluster local)") from None
    # the tasks import the suite from here, and use the CPUs they were given, not every core of the node
    setup = [f"export PYTHONPATH={shlex.quote(str(runner.HERE))}${{PYTHONPATH:+:$PYTHONPATH}}",
             f"export OMP_NUM_THREADS={args.slurm_cpus}"]
    params = {"name": name, "timeout_min": minutes, "cpus_per_task": args.slurm_cpus, "mem_gb": args.slurm_mem,
              "gpus_per_node": args.slurm_gpus or None, "slurm_partition": args.slurm_partition,
              "slurm_array_parallelism": args.slurm_parallelism, "slurm_setup": setup, "local_setup": setup,
              "slurm_additional_parameters": extra_parameters(args.slurm_extra) or None}
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


class ForgetTask(submitit.helpers.Checkpointable):
    """One forget task: its runs in this process, one after the other. Checkpointable, so a task that
    times out is requeued with the same runs, and those it finished are then skipped by their keys."""

    def __call__(self, runs: list[tuple[str, runner.RunConfig]]) -> list[tuple[str, str]]:
        """The runs that failed, as (label, why); a failing run does not stop the others."""
        cache, failed = runner.Cache(), []
        for label, config in runs:
            print(f"--- {label}: python {runner.SCRIPTS[config.scenario]} {shlex.join(config.to_argv())}", flush=True)
            try:
                runner.execute(config, cache)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                failed.append((label, f"error: {e}"))
            except Exception as e:
                traceback.print_exc()
                failed.append((label, f"{type(e).__name__}: {e}"))
        return failed


def pretrain(args, commands: dict) -> list[tuple[str, str, str]]:
    """Train the missing checkpoints, one task each ({label: pretrain_model.py command}); returns the
    failures as (label, log, why)."""
    if not commands:
        return []
    device = ["--device", "cuda" if args.slurm_gpus else "cpu"]
    calls = {label: submitit.helpers.CommandFunction([sys.executable, str(runner.HERE / cmd[0]), *cmd[1:], *device])
             for label, cmd in commands.items()}
    jobs = _submit(args, "ssd-pretrain", args.slurm_pretrain_time, [(fn, ()) for fn in calls.values()])
    return _failures([(job, [label]) for job, label in zip(jobs, calls)], recorded=set)


def forget(args, runs: list) -> list[tuple[str, str, str]]:
    """Execute the runs (runs of experiments.py, with their planned keys), --slurm-runs-per-job per task;
    returns the failures as (label, log, why)."""
    if not runs:
        return []
    device = "cuda" if args.slurm_gpus else "cpu"
    n = args.slurm_runs_per_job
    groups = [runs[i:i + n] for i in range(0, len(runs), n)]
    jobs = _submit(args, "ssd-forget", args.slurm_time,
                   [(ForgetTask(), ([(r.label, replace(r.config, device=device)) for r in g],)) for g in groups])

    def recorded() -> set[str]:  # read when a task has failed: the runs it finished before are not failures
        done = results.done_keys(args.results, runner.record_key)
        return {r.label for r in runs if r.key in done}

    return _failures([(job, [r.label for r in g]) for job, g in zip(jobs, groups)], recorded)


def _submit(args, name: str, minutes: int, calls: list) -> list:
    ex = _executor(args, name, minutes)
    with ex.batch():  # one job array
        jobs = [ex.submit(fn, *fn_args) for fn, fn_args in calls]
    print(f"submitted {len(jobs)} {name} task(s): {jobs[0].job_id.split('_')[0]} (logs under {args.slurm_folder}); "
          f"waiting", flush=True)
    return jobs


def _failures(jobs: list, recorded) -> list[tuple[str, str, str]]:
    """Wait for each (job, its run labels); (label, log, why) for every run of a task that ended without
    its result, unless `recorded()` holds its label, and for every run that a forget task reports failed."""
    failures = []
    for job, labels in jobs:
        job.wait()
        log = f"log: {job.paths.stderr} (output: {job.paths.stdout.name})"
        state = (job.state or "UNKNOWN").split()[0]
        if not job.paths.result_pickle.exists() and state in FAILED_STATES:  # SLURM ended it: no result to read
            done = recorded()
            failures += [(label, log, state) for label in labels if label not in done]
            continue
        try:
            outcome = job.result()
        except Exception as e:  # the task raised (a pretraining that exited non-zero), or left no result
            failures += [(label, log, f"{state}: {(str(e).strip() or type(e).__name__).splitlines()[0][:300]}")
                         for label in labels]
            continue
        if isinstance(outcome, list):  # a forget task's failed runs (a pretraining task returns its output)
            failures += [(label, log, why) for label, why in outcome]
    return failures
