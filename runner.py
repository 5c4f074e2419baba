"""The path of one forget run, shared by the three forget_*_main.py scripts.

flags -> seed -> checkpoint + metadata -> data and splits -> method (timed alone)
      -> metrics (timed apart) -> one results line (locked, atomic) -> wandb
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import datasets
import methods
import metrics
import models
import results
from common import (UserError, run_cli, file_sha256, git_commit, library_versions, make_deterministic, resolve_device,
                    seed_everything)

DEFAULT_DATASET = {"full_class": "digits", "sub_class": "digits5", "random": "digits"}


def build_parser(scenario: str, ssd_params: dict, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--net", "-net", default="resnet18", choices=models.NETS, help="architecture of the checkpoint")
    a("--dataset", "-dataset", default=DEFAULT_DATASET[scenario], choices=datasets.DATASETS,
      help="dataset the checkpoint was trained on (digits/digits5 are embedded and need no download)")
    if scenario != "random":
        what = "fine class (e.g. rocket, mushroom, baby, lamp, sea; or three for digits5)" \
            if scenario == "sub_class" else "class or superclass (e.g. rocket, vehicle2, veg, people; or three for digits)"
        a("--forget-class", "-forget_class", required=True, help=f"name or index of the {what} to forget")
    else:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--forget-count", type=int, default=None,
                       help="number of random training samples to forget (default 100)")
        g.add_argument("--forget-fraction", type=float, default=None,
                       help="fraction to forget, split as torch's random_split does: the paper's 0.00165 "
                            "gives 83 of 50,000 samples, not 100")
    a("--method", "-method", default="ssd", choices=sorted(methods.REGISTRY), help="unlearning method")
    a("--weights", "-weight_path", default=None,
      help="model.pt of the original model (its meta.json lies beside it); by default the checkpoint "
           "whose metadata matches --net, --dataset and --model-seed is taken from --checkpoint-dir")
    a("--checkpoint-dir", default="runs/pretrain", help="where pretrain_model.py writes checkpoints")
    a("--seed", "-seed", type=int, default=0, help="seeds python, numpy and torch; also the random split's seed")
    a("--model-seed", type=int, default=None, help="training seed of the checkpoint to look up (default: --seed)")
    a("--batch-size", "-b", type=int, default=128 if scenario == "random" else 64,
      help="batch size of the importance passes and of methods that train (the paper code's -b: 64 for the "
           "class scenarios, 128 for random forgetting)")
    a("--eval-batch-size", type=int, default=512, help="batch size of evaluation (metrics do not depend on it)")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--data-dir", default="data", help="root folder of the datasets (CIFAR is downloaded there if missing)")
    a("--no-download", action="store_true", help="never try to download a missing dataset")
    a("--results", default="runs/results.jsonl", help="JSON-lines results file; one line is appended per run")
    a("--force", action="store_true", help="run even if this exact run is already in the results file")
    ssd_help = ", ".join(f"{k}: {v[0]}" for k, v in ssd_params.items())
    a("--alpha", type=float, default=None, help=f"SSD selection threshold alpha (default per model: {ssd_help})")
    a("--lambda", dest="lam", type=float, default=None,
      help="SSD dampening constant lambda (default per model: "
           + ", ".join(f"{k}: {v[1]}" for k, v in ssd_params.items()) + ")")
    a("--importance-order", default="paper", choices=datasets.IMPORTANCE_ORDERS,
      help="which samples share a batch in SSD's importance passes (part of SSD's definition, since each "
           "batch's mean gradient is squared). paper: the SSD code's unshuffled D = retain samples class by "
           "class, then the forget samples, which caps I_Df/I_D near |D|/|D_f|; shuffled: D and D_f shuffled, "
           "no cap, so the same alpha dampens far more. ssd_per_sample ignores it")
    a("--importance-cache", default="runs/importance_cache", help="folder of cached full-data importances")
    a("--no-importance-cache", dest="importance_cache", action="store_const", const="",
      help="always recompute SSD's importance on the full training set")
    a("--retrain-epochs", type=int, default=None, help="shorten the schedule of retrain and retrain_paper (default: the pretraining epochs)")
    a("--amp", action="store_true", help="bf16 autocast in importances, training and evaluation")
    a("--deterministic", action="store_true",
      help="deterministic kernels (cuDNN, cuBLAS, torch's deterministic mode): GPU reruns repeat bit for bit, "
           "more slowly; ops without a deterministic kernel warn")
    a("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"],
      help="wandb mode; auto is online when WANDB_API_KEY is set, else offline")
    a("--wandb-project", default=None, help="wandb project (default: <net>-<dataset>-<scenario>)")

    # method hyperparameters (issue 3); defaults are the SSD paper code's unless a help says otherwise
    a("--retrain-paper-lr", type=float, default=0.01,
      help="retrain_paper: SGD learning rate (the paper code's fit_one_cycle default)")
    a("--finetune-epochs", type=int, default=5, help="finetune: epochs on the retain set")
    a("--finetune-lr", type=float, default=0.02, help="finetune: constant SGD learning rate")
    a("--finetune-momentum", type=float, default=0.9, help="finetune: SGD momentum")
    a("--finetune-weight-decay", type=float, default=5e-4, help="finetune: SGD weight decay")
    a("--bt-epochs", type=int, default=1, help="bad_teacher: distillation epochs")
    a("--bt-lr", type=float, default=1e-4, help="bad_teacher: Adam learning rate")
    a("--bt-batch-size", type=int, default=256,
      help="bad_teacher: batch size (the paper code lowered it to 128 for ViT to fit in memory)")
    a("--bt-retain-fraction", type=float, default=0.3,
      help="bad_teacher: random fraction of D_r distilled from the original model")
    a("--bt-temperature", type=float, default=1.0, help="bad_teacher: KL temperature")
    a("--amnesiac-epochs", type=int, default=3, help="amnesiac: epochs on relabelled D_f plus D_r")
    a("--amnesiac-lr", type=float, default=1e-4, help="amnesiac: Adam learning rate")
    a("--amnesiac-batch-size", type=int, default=128, help="amnesiac: batch size")
    a("--unsir-noise-steps", type=int, default=250 if scenario == "sub_class" else 25,
      help="unsir: Adam steps that learn the noise (paper code: 25 full class, 250 sub-class; random, which "
           "the original lacks, takes 25)")
    a("--unsir-noise-lr", type=float, default=0.1, help="unsir: Adam learning rate of the noise")
    a("--unsir-noise-l2", type=float, default=0.1, help="unsir: weight of the noise's mean squared L2 norm")
    a("--unsir-noise-batch", type=int, default=32,
      help="unsir: noise images per noise target. Targets: the forgotten class (full class), the forgotten fine "
           "class's superclass (sub-class); for random forgetting, which the original does not define, every "
           "target among the forgotten samples gets its own noise, so nearly every class is impaired and repaired")
    a("--unsir-noise-copies", type=int, default=80, help="unsir: times each noise image appears in the impair epoch")
    a("--unsir-retain-per-class", type=int, default=500,
      help="unsir: first samples of each target of D_r used to impair and repair")
    a("--unsir-optimizer", default="sgd", choices=["sgd", "adam"],
      help="unsir: optimizer of impair and repair (the SSD paper's code used adam at 1e-4 for both; "
           "UNSIR's own notebook adam at 0.02 and 0.01)")
    a("--unsir-momentum", type=float, default=0.9, help="unsir: SGD momentum (ignored by adam)")
    a("--unsir-lr", type=float, default=0.02, help="unsir: impair learning rate (UNSIR paper)")
    a("--unsir-batch-size", type=int, default=32, help="unsir: impair batch size")
    a("--unsir-repair-lr", type=float, default=0.01, help="unsir: repair learning rate (UNSIR paper)")
    a("--unsir-repair-batch-size", type=int, default=128, help="unsir: repair batch size")
    a("--search-rho", type=float, default=0.1,
      help="ssd_search: class scenarios stop once forget-train accuracy <= rho x the original's (random forgetting "
           "stops at the original's validation accuracy instead)")
    a("--search-max-retain-drop", type=float, default=5.0,
      help="ssd_search: the guard; no step may fall more than this many points below the original's accuracy on "
           "(at most 2,000 of) the retain-validation images")
    a("--search-max-steps", type=int, default=500,
      help="ssd_search: most selection fractions on Potion's grid (|D_f|/|D|/25 x 1.1^k, below 1)")
    a("--search-strategy", default="gallop", choices=["gallop", "geometric"],
      help="ssd_search: geometric is Potion's walk up the grid one step at a time; gallop probes steps 0, 1, 3, 7, ... "
           "and bisects the last gap, which finds the same step in fewer probes when forget and retain accuracy "
           "fall monotonically with the dampened fraction")
    return p


def ssd_defaults(ssd_params: dict, net: str, dataset: str) -> tuple[float, float]:
    """The constants of the calling script: a (net, dataset) entry wins over the net's entry."""
    return ssd_params.get((net, dataset), ssd_params[net])


def find_checkpoint(checkpoint_dir: str | Path, net: str, dataset: str, seed: int) -> Path:
    """The model.pt whose meta.json matches (net, dataset, seed)."""
    found = []
    for meta_path in sorted(Path(checkpoint_dir).glob("*/meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("net") == net and meta.get("dataset") == dataset and meta.get("seed") == seed:
            found.append(meta_path.parent / "model.pt")
    if not found:
        raise UserError(f"no checkpoint for net={net} dataset={dataset} seed={seed} in {checkpoint_dir} "
                        f"(run: python pretrain_model.py --net {net} --dataset {dataset} --seed {seed}, "
                        f"or pass --weights)")
    if len(found) > 1:
        raise UserError(f"several checkpoints match net={net} dataset={dataset} seed={seed}: "
                        f"{', '.join(map(str, found))} (pass one with --weights)")
    return found[0]


def load_meta(weights: Path) -> dict:
    meta_path = weights.parent / "meta.json"
    if not weights.is_file():
        raise UserError(f"checkpoint {weights} not found (pretrain it with pretrain_model.py, or fix --weights)")
    try:
        return json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"metadata {meta_path} is missing or unreadable ({type(e).__name__}) "
                        f"(re-run pretrain_model.py, which writes both files)") from None


def load_model(weights: Path, meta: dict) -> torch.nn.Module:
    """Rebuild the model from its metadata and load the weights safely, after checking the file hash."""
    if meta.get("sha256") and file_sha256(weights) != meta["sha256"]:
        raise UserError(f"checkpoint {weights} does not match the hash in its meta.json: the file was changed "
                        f"or truncated (re-run pretrain_model.py)")
    model = models.build(meta["model_spec"])
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        raise UserError(f"checkpoint {weights} cannot be loaded into {meta['model_spec']}: {msg[:200]} "
                        f"(the file is corrupt or was saved for another model; re-run pretrain_model.py)") from None
    except Exception as e:
        raise UserError(f"checkpoint {weights} is corrupt ({type(e).__name__}) (re-run pretrain_model.py)") from None
    return model


def check_meta(meta: dict, args, data: datasets.Data) -> None:
    for field, want in (("net", args.net), ("dataset", args.dataset)):
        if meta.get(field) != want:
            raise UserError(f"checkpoint was trained with {field}={meta.get(field)!r} but --{field} is {want!r} "
                            f"(pass --{field} {meta.get(field)} or another --weights)")
    if meta["model_spec"]["num_classes"] != data.num_classes:
        raise UserError(f"checkpoint has {meta['model_spec']['num_classes']} classes but {data.name} has "
                        f"{data.num_classes} (use the checkpoint trained on {data.name})")
    if meta.get("split_hash") and meta["split_hash"] != data.split_hash():
        raise UserError(f"the train/validation split rebuilt for {data.name} differs from the checkpoint's "
                        f"(the data changed since pretraining; re-run pretrain_model.py)")


@dataclass
class Plan:
    """Everything about a run that is known before it runs, including its results key."""

    scenario: str
    args: argparse.Namespace
    meta: dict
    weights: Path
    data: datasets.Data
    splits: datasets.Splits
    config: dict
    key: str


def plan(scenario: str, ssd_params: dict, argv: list[str] | None = None, description: str = "",
         data_cache: dict | None = None) -> Plan:
    """Parse flags, find the checkpoint, build the split and the run's key. Nothing is trained.

    `data_cache` lets a driver plan many runs while loading each dataset once."""
    args = build_parser(scenario, ssd_params, description).parse_args(argv)
    default_alpha, default_lam = ssd_defaults(ssd_params, args.net, args.dataset)
    args.alpha = default_alpha if args.alpha is None else args.alpha
    args.lam = default_lam if args.lam is None else args.lam
    if args.alpha < 0 or args.lam < 0:
        raise UserError(f"alpha and lambda must be >= 0, got alpha={args.alpha}, lambda={args.lam} "
                        f"(pass non-negative --alpha and --lambda)")
    if args.model_seed is None:
        args.model_seed = args.seed
    weights = Path(args.weights) if args.weights else find_checkpoint(args.checkpoint_dir, args.net, args.dataset,
                                                                     args.model_seed)
    if weights.is_dir():
        weights = weights / "model.pt"
    meta = load_meta(weights)
    data_args = (args.dataset, args.data_dir, meta["model_spec"]["image_size"], args.net == "vit",
                 meta.get("val_fraction", 0.1), meta.get("split_seed", 0))
    data = (data_cache or {}).get(data_args)
    if data is None:
        data = datasets.build_data(*data_args[:2], image_size=data_args[2], vit=data_args[3],
                                   val_fraction=data_args[4], split_seed=data_args[5], download=not args.no_download)
        if data_cache is not None:
            data_cache[data_args] = data
    check_meta(meta, args, data)
    splits = datasets.build_splits(scenario, data, getattr(args, "forget_class", None), seed=args.seed,
                                   forget_count=getattr(args, "forget_count", None),
                                   forget_fraction=getattr(args, "forget_fraction", None))
    config = {"scenario": scenario, **vars(args), "forget_class": _forget_name(splits, args),
              "checkpoint_sha256": meta.get("sha256"), "model_spec": meta["model_spec"],
              "split_hash": splits.hash(), "recipe": meta["recipe"]}
    key = results.run_key(config)
    return Plan(scenario, args, meta, weights, data, splits, config, key)


def run(scenario: str, ssd_params: dict, argv: list[str] | None = None, description: str = "") -> dict | None:
    """Plan, skip if already done or running elsewhere, else run, evaluate and record. Returns the record."""
    p = plan(scenario, ssd_params, argv, description)
    args = p.args
    what = f"{scenario} {args.method} seed {args.seed} (key {p.key})"
    if not args.force and p.key in results.done_keys(args.results):
        print(f"skip: {what} is already in {args.results} (--force reruns it)")
        return None
    with results.claim(args.results, p.key) as mine:
        if not mine:
            print(f"skip: {what} is running in another process")
            return None
        if not args.force and p.key in results.done_keys(args.results):  # finished while we planned
            return None
        return _run_claimed(p)


def _forget_name(splits: datasets.Splits, args) -> str | None:
    if splits.scenario == "full_class":
        return splits.data.classes[splits.forget_classes[0]]
    if splits.scenario == "sub_class":
        return splits.data.fine_classes[int(splits.data.train.fine[splits.forget_idx[0]])]
    return None


def method_cfg(p: Plan, device: torch.device) -> argparse.Namespace:
    """What a method receives: the run's flags plus the device and the checkpoint's facts."""
    return argparse.Namespace(**{**vars(p.args), "device": device}, model_spec=p.meta["model_spec"],
                              pretrained=bool(p.meta.get("pretrained")), recipe=p.meta["recipe"],
                              checkpoint_sha256=p.meta.get("sha256"))


def _run_claimed(p: Plan) -> dict:
    args, scenario, meta, weights, splits, config, key = p.args, p.scenario, p.meta, p.weights, p.splits, p.config, p.key
    if args.deterministic:
        make_deterministic()
    seed_everything(args.seed)
    device = resolve_device(args.device)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    model = load_model(weights, meta).to(device)
    cfg = method_cfg(p, device)
    print(f"{scenario}: {args.method} on {args.net}/{args.dataset}, forget {config['forget_class'] or ''} "
          f"({len(splits.forget_idx)} train samples), alpha={args.alpha} lambda={args.lam}, seed {args.seed}, {device}")

    _sync(device)
    t0 = time.perf_counter()
    model, info = methods.REGISTRY[args.method](model, splits, cfg)
    _sync(device)
    method_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    random_model = models.initial(meta["model_spec"], pretrained=False, seed=args.seed + 2).to(device)
    m = metrics.evaluate(model, splits, device, random_model, args.eval_batch_size, args.amp)
    eval_s = time.perf_counter() - t0

    times = {"method_s": method_s, "eval_s": eval_s, **{k: v for k, v in info.items() if k.endswith("_s")}}
    record = {"key": key, "config": config, "metrics": m, "times": times,
              "method_info": {k: v for k, v in info.items() if not k.endswith("_s")},
              "checkpoint": {"path": str(weights), "sha256": meta.get("sha256"), "train_seed": meta.get("seed"),
                             "val_acc": meta.get("val_acc"), "test_acc": meta.get("test_acc")},
              "git": git_commit(), "versions": library_versions(), "started": started,
              "host": socket.gethostname(),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    results.append(args.results, record)
    dampened = f"  dampened {100 * info['dampened_fraction']:.3f}%" if "dampened_fraction" in info else ""
    if "search_status" in info:  # ssd_search says whether it reached its target
        dampened += f"  {info['search_status']} ({info['search_steps']} steps)"
    print(f"Df {_fmt(m['df'])}  retain-test {_fmt(m['retain_test_acc'])}  test {_fmt(m['test_acc'])}  "
          f"MIA {_fmt(m['mia'])}  ZRF {m.get('zrf', float('nan')):.3f}{dampened}  method {method_s:.2f}s  "
          f"eval {eval_s:.2f}s")
    if info.get("dampened") == 0 and "chosen_alpha" not in info:  # assd and ssd_search choose alpha themselves
        print(f"warning: alpha={args.alpha} selects nothing: the largest I_Df/I_D is {info['max_ratio']:.3g} "
              f"(the cap |D|/|D_f| is {info['ratio_cap']:.3g}); the model is unchanged (pass a smaller --alpha)",
              file=sys.stderr)
    if info.get("search_status") == "target_unreachable":
        print(f"warning: ssd_search cannot bring forget-train accuracy to {info['target_forget_train_acc']:.2f} "
              f"with lambda=1 anywhere on its grid (it reached {info['forget_train_acc']:.2f}; the largest I_Df/I_D is "
              f"{info['max_ratio']:.3g}): D_f's gradients are too small to select or dampen enough", file=sys.stderr)
    try:
        log_dir = Path(args.results).parent
        results.log_wandb(record, args.wandb_project or f"{args.net}-{args.dataset}-{scenario}",
                          group=str(config["forget_class"] or f"random{len(splits.forget_idx)}"),
                          name=args.method, mode=args.wandb, run_dir=log_dir)
    except Exception as e:  # the results line is already safe; tracking must not lose it
        print(f"warning: wandb logging failed: {type(e).__name__}: {e}", file=sys.stderr)
    return record


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(scenario: str, ssd_params: dict, description: str) -> None:
    run_cli(lambda: run(scenario, ssd_params, description=description) and None)
