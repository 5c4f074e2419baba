"""Benchmark of the SSD suite: it prints numbers; it is not a test.

    python bench/bench_ssd.py                   # CPU: width-16 ResNet18, 32x32 inputs
    python bench/bench_ssd.py --device cuda     # full width 64 unless --width says otherwise
    python bench/bench_ssd.py --quick           # small sizes: a smoke check of every part

Four measurements, each timing the suite's own code:
  1. throughput of ssd.importance against a plain SGD training step (same model, batch size, data)
  2. one full-class SSD request (methods.REGISTRY['ssd']) with the I_D cache cold and warm,
     against one epoch of retraining (training.train) on the same |D| images
  3. the MIA: logits by training.predict at batch size 512 against batch size 1, then
     metrics.membership_attack
  4. peak RSS of a real forget run (pretrain_model.py, then forget_full_class_main.py) in a subprocess
  5. ssd_search (both walks) against a plain SSD request, each with a cold I_D cache, on a digits model
     trained here (the quick suite's kind of checkpoint), through the task script's own flags

Timings are medians over --repeats runs, each after its own untimed setup (a fresh copy of the model,
a fresh cache folder), with the clock stopped only after CUDA has finished. The runs being compared
are interleaved (A, B, A, B, ...), so a change in machine load hits both sides alike; each part
prints the raw times and how long it took. Data is random uint8 images served through
datasets.LabeledImages, so the real transform and loader path runs.

The thread count is torch's default; the script never changes it, and prints it with the load
average. On a CPU that other jobs share, cap the threads from outside (OMP_NUM_THREADS=1 python
bench/bench_ssd.py): two-thread runs contending for two cores spin against each other and measured
about 12x slower per batch here than a one-thread run.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import signal
import statistics
from collections import defaultdict
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()  # the wall time reported at the end includes the imports below

os.environ.setdefault("TQDM_DISABLE", "1")  # the suite's progress bars would drown the tables (children inherit it)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Subset, TensorDataset  # noqa: E402

import datasets  # noqa: E402
import methods  # noqa: E402
import metrics  # noqa: E402
import models  # noqa: E402
import runner  # noqa: E402
import ssd  # noqa: E402
import training  # noqa: E402
from common import UserError, resolve_device  # noqa: E402

NUM_CLASSES = 10
IMAGE_SIZE = 32


# -----------------------------------------------------------------------------
# timing helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    """Wall time of fn() (after the GPU has finished its work) and what fn returned."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def fmt_times(times: list[float]) -> str:
    return "[" + ", ".join(f"{t:.2f}" for t in times) + "] s"


def machine(device: torch.device) -> str:
    """CPU model, cores, torch version and the GPU if one is used: what a reader needs to compare."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"{cpu}, {usable} cores ({torch.get_num_threads()} torch threads)", f"torch {torch.__version__}"]
    if hasattr(os, "getloadavg"):  # how busy the machine was: other jobs slow every number here
        parts.append(f"load average {os.getloadavg()[0]:.1f} at start")
    if device.type == "cuda":
        parts.append(f"CUDA {torch.version.cuda} on {torch.cuda.get_device_name(device)}")
    return "; ".join(parts)


# -----------------------------------------------------------------------------
# synthetic data, wrapped exactly like the suite's own datasets

def synthetic_data(train_size: int, forget_size: int, test_size: int, seed: int = 0) -> datasets.Data:
    """Random 32x32 uint8 images as a datasets.Data. Class 0 holds exactly `forget_size` training
    images (the class to forget); the rest are spread over the other classes. No validation split,
    so D (splits.full_train) is all `train_size` images."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(train_size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    y = np.concatenate([np.zeros(forget_size, dtype=np.int64),
                        1 + np.arange(train_size - forget_size) % (NUM_CLASSES - 1)])
    rng.shuffle(y)
    x_test = rng.integers(0, 256, size=(test_size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    y_test = np.arange(test_size) % NUM_CLASSES
    eval_tf = datasets.make_transform("synthetic", IMAGE_SIZE, train=False, native_size=IMAGE_SIZE)
    aug_tf = datasets.make_transform("synthetic", IMAGE_SIZE, train=True, native_size=IMAGE_SIZE)
    train = datasets.LabeledImages(datasets._UInt8Images(x), y, None, eval_tf)
    test = datasets.LabeledImages(datasets._UInt8Images(x_test), y_test, None, eval_tf)
    classes = [f"class{i}" for i in range(NUM_CLASSES)]
    return datasets.Data(name="synthetic", train=train, test=test, train_aug=train.with_transform(aug_tf),
                         train_idx=np.arange(train_size), val_idx=np.array([], dtype=np.int64),
                         classes=classes, fine_classes=classes, image_size=IMAGE_SIZE)


# -----------------------------------------------------------------------------
# 1. importance pass against a training step

def sgd_epoch(model: nn.Module, dl, device: torch.device) -> None:
    """The baseline: a standard SGD training step per batch (forward, CE, backward, step)."""
    model.train()
    opt = training.make_optimizer(model, training.Recipe(epochs=1))  # SGD, lr 0.1, momentum 0.9, wd 5e-4
    for x, y in dl:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def forward_backward(model: nn.Module, dl, device: torch.device) -> None:
    """ssd.importance without its accumulation: what the importance pass would cost at best."""
    model.eval()
    for x, y in dl:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def bench_throughput(spec: dict, args, device: torch.device) -> dict:
    # Already-transformed tensors in memory and no loader workers: both passes see the same batches
    # at no data cost, so the ratio compares compute only.
    n = args.throughput_batches * args.batch_size
    gen = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),
                       torch.randint(0, NUM_CLASSES, (n,), generator=gen))
    dl = training.loader(ds, args.batch_size, device, workers=0)
    warm = training.loader(Subset(ds, range(2 * args.batch_size)), args.batch_size, device, workers=0)
    model = models.initial(spec, pretrained=False, seed=0).to(device)

    ssd.importance(model, warm, device)  # warm-up: allocator, cuDNN autotuning, first-call overheads
    sgd_epoch(copy.deepcopy(model), warm, device)
    imp_all, fb_all, train_all = [], [], []
    for _ in range(args.repeats):
        imp_all.append(timed(lambda: ssd.importance(model, dl, device), device)[0])
        fb_all.append(timed(lambda: forward_backward(model, dl, device), device)[0])
        trainee = copy.deepcopy(model)  # every training repeat starts from the same weights: the same work
        train_all.append(timed(lambda: sgd_epoch(trainee, dl, device), device)[0])
    imp_s, fb_s, train_s = (statistics.median(t) for t in (imp_all, fb_all, train_all))
    r = {"images": n, "importance": n / imp_s, "fwd_bwd": n / fb_s, "train": n / train_s}
    r["ratio"] = r["importance"] / r["train"]
    print(f"\n## 1. Importance pass vs training step ({n} images, batch {args.batch_size}, tensors in memory)\n")
    print("| pass | images/s | times |\n|---|---:|---|")
    print(f"| ssd.importance (eval mode, grad**2 accumulated) | {r['importance']:.1f} | {fmt_times(imp_all)} |")
    print(f"| forward+backward only (eval mode, nothing accumulated) | {r['fwd_bwd']:.1f} | {fmt_times(fb_all)} |")
    print(f"| SGD training step (train mode: forward, CE, backward, step) | {r['train']:.1f} | {fmt_times(train_all)} |")
    print(f"\nimportance / training = {r['ratio']:.2f} (target >= 0.8: {'yes' if r['ratio'] >= 0.8 else 'NO'}); "
          f"importance / forward+backward alone = {r['importance'] / r['fwd_bwd']:.2f} (below 1: the cost of accumulating)")
    return r


# -----------------------------------------------------------------------------
# 2. one SSD request, cache cold and warm, against one retraining epoch

def ssd_args(args, device: torch.device, cache_dir: str) -> tuple[methods.SSDParams, methods.RunContext]:
    """What methods._ssd and methods.ssd_importances read from a run's flags. In the paper's batch order
    D ends with the forget samples, so the warm request is the same request again (another alpha, say)."""
    return methods.SSDParams(alpha=10.0, lam=1.0, importance_order="paper"), methods.RunContext(
        device=device, seed=0, batch_size=args.batch_size, amp=False, recipe={}, model_spec={}, pretrained=False,
        checkpoint_sha256="bench-fixed-checkpoint", importance_cache=cache_dir)


def bench_ssd_request(spec: dict, data: datasets.Data, args, device: torch.device, tmp: Path) -> dict:
    splits = datasets.build_splits("full_class", data, forget_class="class0")
    n_d, n_f = len(splits.data.train_idx), len(splits.forget_idx)
    original = models.initial(spec, pretrained=False, seed=0).to(device)
    ssd_fn = methods.REGISTRY["ssd"].fn
    # the baseline: one epoch of the pretraining recipe (augmented data, SGD, warm-up) on the same images
    train_set = Subset(data.train_aug, data.train_idx.tolist())
    recipe = training.Recipe(epochs=1, batch_size=args.batch_size)
    cold, warm, epoch_all, infos = [], [], [], []
    for i in range(args.repeats):
        cache = tmp / f"cache{i}"  # empty: the first request computes and stores I_D
        for times in (cold, warm):  # the second request, same folder, finds I_D on disk
            model = copy.deepcopy(original)  # dampening changes the model, so every request gets a fresh one
            seconds, (_, info) = timed(lambda: ssd_fn(model, splits, *ssd_args(args, device, str(cache))), device)
            times.append(seconds)
            infos.append(info)
        fresh = models.initial(spec, pretrained=False, seed=1).to(device)
        epoch_all.append(timed(lambda: training.train(fresh, train_set, recipe, device, seed=0), device)[0])
    hits = [info["cache_hit"] for info in infos]
    if hits != [False, True] * args.repeats:  # then "warm" timed a recomputation: the numbers would lie
        sys.exit(f"error: expected the cache to miss, then hit, on every repeat; got cache_hit {hits}")

    cold_s, warm_s, epoch_s = (statistics.median(t) for t in (cold, warm, epoch_all))
    c, w = infos[0], infos[1]
    r = {"n_d": n_d, "n_f": n_f, "cold": cold_s, "warm": warm_s, "epoch": epoch_s, "cold_over_warm": cold_s / warm_s}
    print(f"\n## 2. Full-class SSD request, |D| = {n_d}, |D_f| = {n_f} (|D|/|D_f| = {n_d / n_f:.0f}), batch {args.batch_size}\n")
    print("| run | median s | times | speed-up vs 1 retrain epoch |\n|---|---:|---|---:|")
    print(f"| SSD, cache cold (I_D computed and stored) | {cold_s:.2f} | {fmt_times(cold)} | {epoch_s / cold_s:.1f}x |")
    print(f"| SSD, cache warm (I_D loaded) | {warm_s:.2f} | {fmt_times(warm)} | {epoch_s / warm_s:.1f}x |")
    print(f"| retrain, 1 epoch on {n_d} images | {epoch_s:.2f} | {fmt_times(epoch_all)} | 1.0x |")
    print(f"\nfirst cold request: I_D {c['importance_full_s']:.2f} s, I_Df {c['importance_forget_s']:.2f} s, "
          f"dampened {100 * c['dampened_fraction']:.2f}% of parameters; first warm request: I_D "
          f"{w['importance_full_s']:.3f} s (cache hit), I_Df {w['importance_forget_s']:.2f} s")
    print(f"warm is {r['cold_over_warm']:.1f}x faster than cold (target >= 10x at this ratio: "
          f"{'yes' if r['cold_over_warm'] >= 10 else 'NO'})")
    return r


# -----------------------------------------------------------------------------
# 3. the MIA, batched against one sample at a time

def bench_mia(spec: dict, data: datasets.Data, args, device: torch.device) -> dict:
    # members (retain-train), non-members (test) and targets (forget-train), as metrics.evaluate uses them
    splits = datasets.build_splits("full_class", data, forget_class="class0")
    n_target = min(len(splits.forget_idx), args.mia_size // 4)
    n_non = min(len(data.test), args.mia_size // 4)
    n_mem = args.mia_size - n_target - n_non
    parts = [Subset(data.train, splits.retain_idx[:n_mem].tolist()), Subset(data.test, range(n_non)),
             Subset(data.train, splits.forget_idx[:n_target].tolist())]
    model = models.initial(spec, pretrained=False, seed=0).to(device)

    def mia(batch_size: int) -> float:
        member, non_member, target = (training.predict(model, p, device, batch_size)[0] for p in parts)
        return metrics.membership_attack(member, non_member, target)[0]

    mia(512)  # warm-up
    batched_all, single_all = [], []
    for _ in range(args.repeats):
        batched_all.append(timed(lambda: mia(512), device)[0])
        single_all.append(timed(lambda: mia(1), device)[0])
    batched_s, single_s = statistics.median(batched_all), statistics.median(single_all)
    n = sum(len(p) for p in parts)
    r = {"n": n, "batched": batched_s, "single": single_s, "speedup": single_s / batched_s}
    print(f"\n## 3. MIA on {n} samples ({n_mem} members, {n_non} non-members, {n_target} targets): "
          f"logits by training.predict, then metrics.membership_attack\n")
    print("| batch size | median s | times |\n|---|---:|---|")
    print(f"| 512 | {batched_s:.2f} | {fmt_times(batched_all)} |")
    print(f"| 1 (the paper's code) | {single_s:.2f} | {fmt_times(single_all)} |")
    print(f"\nbatched is {r['speedup']:.1f}x faster")
    return r


# -----------------------------------------------------------------------------
# 4. peak RSS of a real forget run

def run_child(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """Run `cmd`; return its wall time (s) and its own peak RSS (MiB). os.wait4 gives the rusage of
    that one child, where getrusage(RUSAGE_CHILDREN) would report the largest child so far."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted: take the child down with us
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited with {proc.returncode}; its output:\n{log.read_text()[-3000:]}")
    kib = usage.ru_maxrss / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux
    return wall, kib / 1024


def bench_rss(args, device: torch.device, tmp: Path) -> dict:
    py, ckpt = sys.executable, tmp / "checkpoints"
    dev = ["--device", device.type]
    pretrain = [py, str(ROOT / "pretrain_model.py"), "--dataset", "digits", "--width", str(args.width),
                "--epochs", "1", "--milestones", "--checkpoint-dir", str(ckpt), "--seed", "0", *dev]
    config = runner.RunConfig("full_class", forget_class="three", method="ssd", checkpoint_dir=str(ckpt), seed=0,
                              results=str(tmp / "r.jsonl"), importance_cache=str(tmp / "forget_cache"),
                              wandb="disabled", device=device.type)
    forget = [py, str(ROOT / runner.SCRIPTS["full_class"]), *config.to_argv()]
    # the children run in the temporary folder, so nothing they write lands in the repository
    imports = [py, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import runner"]
    # the floor: what importing the suite (torch, torchvision, sklearn, ...) costs before any work
    imp_s, imp_mib = run_child(imports, tmp, tmp / "imports.log")
    pre_s, pre_mib = run_child(pretrain, tmp, tmp / "pretrain.log")
    run_s, run_mib = run_child(forget, tmp, tmp / "forget.log")
    summary = [line for line in (tmp / "forget.log").read_text().splitlines() if line.startswith("Df ")]
    r = {"rss": run_mib, "wall": run_s, "imports_rss": imp_mib}
    print(f"\n## 4. Peak RSS of a forget run (digits, width {args.width}, ssd, {device.type}, cold cache)\n")
    print("| child process | peak RSS MiB | wall s |\n|---|---:|---:|")
    print(f"| python -c 'import runner' (imports only) | {imp_mib:.0f} | {imp_s:.1f} |")
    print(f"| pretrain_model.py, 1 epoch | {pre_mib:.0f} | {pre_s:.1f} |")
    print(f"| forget_full_class_main.py --method ssd | {run_mib:.0f} | {run_s:.1f} |")
    if summary:
        print(f"\nforget run: {summary[-1]}")
    return r


# -----------------------------------------------------------------------------
# 5. ssd_search against a plain SSD request

def bench_search(args, device: torch.device, tmp: Path) -> dict:
    import pretrain_model

    epochs = ["--epochs", "2", "--milestones", "1"] if args.quick else []
    ckpt = pretrain_model.main(["--dataset", "digits", "--width", str(args.width), "--seed", "1", "--device",
                                device.type, "--checkpoint-dir", str(tmp / "search_checkpoints"), *epochs])
    runs = {"ssd": [], "ssd_search": [], "ssd_search geometric": []}
    infos = defaultdict(list)
    for cls in args.search_classes:
        base = runner.RunConfig("full_class", forget_class=cls, weights=str(ckpt / "model.pt"), device=device.type)
        plans = {name: runner.plan(dataclasses.replace(base, method=name.split()[0])) for name in runs}
        original = models.load_checkpoint(plans["ssd"].weights, plans["ssd"].meta).to(device)
        for i in range(args.repeats):
            for name, p in plans.items():  # interleaved, each with an empty cache folder: I_D is computed every time
                method = methods.REGISTRY[p.config.method]
                ctx = dataclasses.replace(runner.run_context(p, device), importance_cache=str(
                    tmp / f"search_cache_{cls}_{i}_{name.replace(' ', '_')}"))
                hp = p.config.hp
                if name.endswith("geometric"):
                    hp = dataclasses.replace(hp, search_strategy="geometric")
                model = copy.deepcopy(original)
                seconds, (_, info) = timed(lambda: method.fn(model, p.splits, hp, ctx), device)
                runs[name].append(seconds)
                infos[name].append(info)
        s = {name: statistics.median(t[-args.repeats:]) for name, t in runs.items()}
        search = infos["ssd_search"][-1]
        print(f"class {cls}: ssd {s['ssd']:.2f} s, ssd_search {s['ssd_search']:.2f} s "
              f"({search['search_status']}, {search['search_steps']} steps, alpha {search['chosen_alpha']}), "
              f"geometric {s['ssd_search geometric']:.2f} s ({infos['ssd_search geometric'][-1]['search_steps']} steps)")
    n = len(args.search_classes) * args.repeats
    med = {name: statistics.median(t) for name, t in runs.items()}
    r = {"classes": len(args.search_classes), **med, "ratio": med["ssd_search"] / med["ssd"],
         "worst_ratio": max(a / b for a, b in zip(runs["ssd_search"], runs["ssd"])),
         "geometric_ratio": med["ssd_search geometric"] / med["ssd"],
         "steps": statistics.mean(i["search_steps"] for i in infos["ssd_search"]),
         "geometric_steps": statistics.mean(i["search_steps"] for i in infos["ssd_search geometric"])}
    print(f"\n## 5. ssd_search against a plain SSD request, cold cache (digits, width {args.width}, full class, "
          f"classes {' '.join(args.search_classes)}, {n} requests each)\n")
    print("| run | median s | mean steps | times |\n|---|---:|---:|---|")
    print(f"| ssd (alpha from the task script) | {med['ssd']:.2f} | - | {fmt_times(runs['ssd'])} |")
    print(f"| ssd_search, gallop (default) | {med['ssd_search']:.2f} | {r['steps']:.1f} | {fmt_times(runs['ssd_search'])} |")
    print(f"| ssd_search, geometric (Potion's walk) | {med['ssd_search geometric']:.2f} | {r['geometric_steps']:.1f} | "
          f"{fmt_times(runs['ssd_search geometric'])} |")
    print(f"\nssd_search / ssd = {r['ratio']:.2f} (median), {r['worst_ratio']:.2f} (worst request; target <= 2: "
          f"{'yes' if r['worst_ratio'] <= 2 else 'NO'}); geometric / ssd = {r['geometric_ratio']:.2f}")
    return r


# -----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    a("--width", type=int, default=None, help="ResNet18 base width (default: 16 on CPU, 64 on CUDA)")
    a("--repeats", type=int, default=3, help="timed repeats per measurement; the median is reported")
    a("--train-size", type=int, default=10000, help="|D| of the SSD request and images per retrain epoch")
    a("--forget-size", type=int, default=500, help="|D_f| of the SSD request (one whole class)")
    a("--batch-size", type=int, default=64, help="batch size of importances and training")
    a("--mia-size", type=int, default=2000, help="samples whose logits the MIA collects")
    a("--throughput-batches", type=int, default=None, help="batches per throughput repeat (default: 10 CPU, 100 CUDA)")
    a("--search-classes", nargs="+", default=["three", "seven", "nine"], help="digits classes of part 5")
    a("--parts", default="12345", help="which measurements to run, e.g. 13")
    a("--quick", action="store_true", help="much smaller sizes, for a smoke check")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.forget_size, args.mia_size, args.throughput_batches = 1000, 50, 200, 3
    if args.repeats < 1 or not 0 < args.forget_size < args.train_size:
        p.error("need --repeats >= 1 and 0 < --forget-size < --train-size")
    return args


def main(argv: list[str] | None = None) -> None:
    # SIGTERM as an exception, so the temporary folder is removed and a running child is killed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except UserError as e:
        sys.exit(f"error: {e}")
    args.width = args.width or (64 if device.type == "cuda" else 16)
    args.throughput_batches = args.throughput_batches or (100 if device.type == "cuda" else 10)
    spec = models.make_spec("resnet18", NUM_CLASSES, IMAGE_SIZE, width=args.width)
    n_params = models.count_parameters(models.build(spec))
    where = machine(device)
    print(f"# SSD suite benchmark\n\nmachine: {where}\ndevice: {device}; model: ResNet18 width {args.width} "
          f"({n_params:,} parameters), {IMAGE_SIZE}x{IMAGE_SIZE} inputs; batch {args.batch_size}; "
          f"median of {args.repeats}{'; QUICK sizes' if args.quick else ''}", flush=True)

    res, took = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_ssd_") as tmp:
        tmp = Path(tmp)
        data = synthetic_data(args.train_size, args.forget_size, test_size=max(1000, args.mia_size // 4))
        parts = {1: lambda: bench_throughput(spec, args, device),
                 2: lambda: bench_ssd_request(spec, data, args, device, tmp),
                 3: lambda: bench_mia(spec, data, args, device),
                 4: lambda: bench_rss(args, device, tmp),
                 5: lambda: bench_search(args, device, tmp)}
        for k, run in parts.items():
            if str(k) in args.parts:
                t0 = time.perf_counter()
                res[k] = run()
                took[k] = time.perf_counter() - t0
                print(f"\n(part {k} took {took[k]:.0f} s)", flush=True)
    total = time.perf_counter() - T_START

    # the summary, ready to paste into the README
    print(f"\n## Summary\n\n{where}; {device}, ResNet18 width {args.width}, batch {args.batch_size}, "
          f"median of {args.repeats}\n")
    print("| measurement | result | detail |\n|---|---|---|")
    if 1 in res:
        r = res[1]
        print(f"| importance pass vs SGD training step | {r['ratio']:.2f}x the training throughput "
              f"(target >= 0.8) | {r['importance']:.0f} vs {r['train']:.0f} images/s |")
    if 2 in res:
        r = res[2]
        print(f"| full-class SSD request, \\|D\\| {r['n_d']}, \\|D_f\\| {r['n_f']} | warm {r['cold_over_warm']:.1f}x "
              f"faster than cold (target >= 10x); {r['epoch'] / r['cold']:.1f}x (cold) and {r['epoch'] / r['warm']:.1f}x "
              f"(warm) faster than 1 retrain epoch | cold {r['cold']:.2f} s, warm {r['warm']:.2f} s, "
              f"1 epoch {r['epoch']:.2f} s |")
    if 3 in res:
        r = res[3]
        print(f"| MIA on {r['n']} samples | batched {r['speedup']:.1f}x faster | batch 512: {r['batched']:.2f} s, "
              f"batch 1: {r['single']:.2f} s |")
    if 4 in res:
        r = res[4]
        print(f"| peak RSS of a forget run (digits, ssd, width {args.width}) | {r['rss']:.0f} MiB | "
              f"forget_full_class_main.py, {r['wall']:.1f} s wall; importing the suite alone: "
              f"{r['imports_rss']:.0f} MiB |")
    if 5 in res:
        r = res[5]
        print(f"| ssd_search vs a plain SSD request, cold cache (digits, {r['classes']} classes) | {r['ratio']:.2f}x "
              f"the time, worst {r['worst_ratio']:.2f}x (target <= 2) | {r['ssd_search']:.2f} s vs {r['ssd']:.2f} s, "
              f"{r['steps']:.1f} steps; Potion's walk {r['ssd_search geometric']:.2f} s, "
              f"{r['geometric_steps']:.1f} steps |")
    load = f"; load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    print(f"\nbenchmark wall time{load}: {total:.0f} s ({', '.join(f'part {k}: {v:.0f} s' for k, v in took.items())})")


if __name__ == "__main__":
    main()
