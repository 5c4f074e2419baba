"""The path of one forget run, shared by the three forget_*_main.py scripts.

flags -> seed -> checkpoint + metadata -> data and splits -> method (timed alone)
      -> metrics (timed apart) -> one results line (locked, atomic) -> wandb
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import socket
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

import datasets
import methods
import metrics
import models
import results
from common import (ArgumentParser, HelpFormatter, UserError, add_shared_flags, check_output_dir, file_sha256,
                    fraction, git_commit, library_versions, make_deterministic, positive_int, resolve_device, run_cli,
                    seed_everything, seed_int)

DEFAULT_DATASET = {"full_class": "digits", "sub_class": "digits5", "random": "digits"}

# What consecutive runs in one process may share: loaded datasets (keyed by the arguments that define
# them) and checkpoint weights (keyed by path and sha256). A script runs once and leaves this None;
# the driver's persistent worker (experiments.serve) sets it to {"data": {}, "weights": {}}. Every
# run still builds a fresh model and loads these weights into it; the shared tensors are only read.
SHARED: dict | None = None


# Fields of a run's config that define it for every method; the chosen method's own hyperparameters
# complete its key. Nothing else goes in, so a new flag for another method changes no existing key.
COMMON_KEY = ("scenario", "method", "net", "dataset", "forget_class", "forget_count", "forget_fraction", "seed",
              "model_seed", "batch_size", "amp", "checkpoint_sha256", "model_spec", "split_hash", "recipe")
SCRIPTS = {"full_class": "forget_full_class_main", "sub_class": "forget_sub_class_main",
           "random": "forget_random_main"}


def build_parser(scenario: str, ssd_params: dict, description: str) -> argparse.ArgumentParser:
    p = ArgumentParser(description=description, formatter_class=HelpFormatter)
    a = p.add_argument
    add_shared_flags(p, "net", "dataset", dataset=DEFAULT_DATASET[scenario],
                     dataset_help="dataset the checkpoint was trained on (digits/digits5 are embedded and need no "
                                  "download)", net_help="architecture of the checkpoint")
    if scenario != "random":
        what = "fine class (e.g. rocket, mushroom, baby, lamp, sea; or three for digits5)" \
            if scenario == "sub_class" else "class or superclass (e.g. rocket, vehicle2, veg, people; or three for digits)"
        a("--forget-class", "-forget_class", required=True, help=f"name or index of the {what} to forget")
    else:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--forget-count", type=positive_int, default=None,
                       help="number of random training samples to forget (default 100)")
        g.add_argument("--forget-fraction", type=fraction, default=None,
                       help="fraction to forget, split as torch's random_split does: the paper's 0.00165 "
                            "gives 83 of 50,000 samples, not 100")
    a("--method", "-method", default="ssd", choices=sorted(methods.REGISTRY), help="unlearning method")
    a("--weights", "-weight_path", default=None,
      help="model.pt of the original model (its meta.json lies beside it); by default the checkpoint "
           "whose metadata matches --net, --dataset and --model-seed is taken from --checkpoint-dir")
    add_shared_flags(p, "checkpoint_dir", "seed", seed_help="seeds python, numpy and torch; also the random split's seed")
    a("--model-seed", type=seed_int, default=None, help="training seed of the checkpoint to look up (default: --seed)")
    a("--batch-size", "-b", type=positive_int, default=128 if scenario == "random" else 64,
      help="batch size of the importance passes and of methods that train (the paper code's -b: 64 for the "
           "class scenarios, 128 for random forgetting)")
    a("--eval-batch-size", type=positive_int, default=256,
      help="batch size of evaluation (metrics do not depend on it; on a CPU, 512 ran 1.5x slower per image than 64-256)")
    add_shared_flags(p, "device", "data_dir", "no_download", "results")
    a("--force", action="store_true", help="run even if this exact run is already in the results file")
    a("--importance-cache", default="runs/importance_cache", help="folder of cached full-data importances")
    a("--no-importance-cache", dest="importance_cache", action="store_const", const="",
      help="always recompute SSD's importance on the full training set")
    add_shared_flags(p, "amp", "deterministic")
    a("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"],
      help="wandb mode; auto is online when WANDB_API_KEY is set, else offline")
    a("--wandb-project", default=None, help="wandb project (default: <net>-<dataset>-<scenario>)")
    add_method_flags(p.add_argument_group("method hyperparameters (each method reads only its own)"), scenario,
                     ssd_params)
    return p


def add_method_flags(group, scenario: str, ssd_params: dict) -> None:
    """One flag per hyperparameter field of the registered methods; a field shared by several methods
    (alpha, retrain_epochs) is one flag."""
    seen = set()
    for method in methods.REGISTRY.values():
        for f in fields(method.params):
            if f.name in seen:
                continue
            seen.add(f.name)
            meta = dict(f.metadata)
            help = meta["help"]
            if f.name in ("alpha", "lam"):
                i = 0 if f.name == "alpha" else 1
                help += "; here: " + ", ".join(f"{'/'.join(k) if isinstance(k, tuple) else k}: {v[i]}"
                                                for k, v in ssd_params.items())
            kwargs = {"dest": f.name, "default": meta.get("by_scenario", {}).get(scenario, f.default), "help": help}
            kind = meta.get("type", type(f.default))
            if kind is not str:
                kwargs["type"] = kind
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            group.add_argument(meta.get("flag", "--" + f.name.replace("_", "-")), **kwargs)


def ssd_defaults(ssd_params: dict, net: str, dataset: str, scenario: str = "") -> tuple[float, float]:
    """The constants of the calling script: a (net, dataset) entry wins over the net's entry."""
    found = ssd_params.get((net, dataset), ssd_params.get(net))
    if found is None:
        script = f"{SCRIPTS.get(scenario, 'the task script')}.py"
        raise UserError(f"{script} has no SSD_PARAMS entry for net {net!r} (add {net!r}: (alpha, lambda) to "
                        f"SSD_PARAMS at the top of {script}, or pass both --alpha and --lambda)")
    return found


def script_params(scenario: str) -> dict:
    """The SSD_PARAMS constant at the top of the scenario's task script, as the script itself uses it."""
    return importlib.import_module(SCRIPTS[scenario]).SSD_PARAMS


def record_key(config: dict) -> str | None:
    """A stored run's key under today's rule, recomputed from its config (None for an unknown method)."""
    method = methods.REGISTRY.get(config.get("method"))
    return None if method is None else results.run_key(config, COMMON_KEY + tuple(method.param_names))


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
    digest = file_sha256(weights) if meta.get("sha256") or SHARED is not None else None
    if meta.get("sha256") and digest != meta["sha256"]:
        raise UserError(f"checkpoint {weights} does not match the hash in its meta.json: the file was changed "
                        f"or truncated (re-run pretrain_model.py)")
    model = models.build(meta["model_spec"])
    cached = SHARED["weights"] if SHARED is not None else {}
    key = (str(weights.resolve()), digest)
    try:
        state = cached.get(key) or torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)  # copies into the new model's tensors: the cached ones stay pristine
        if SHARED is not None and key not in cached:
            cached.clear()  # the grid runs one checkpoint's runs together: keep one, not a ViT per seed
            cached[key] = state
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
    hp: object  # the chosen method's hyperparameters (its dataclass in methods.py)


def plan(scenario: str, ssd_params: dict, argv: list[str] | None = None, description: str = "",
         data_cache: dict | None = None) -> Plan:
    """Parse flags, find the checkpoint, build the split and the run's key. Nothing is trained.

    `data_cache` lets a driver plan many runs while loading each dataset once."""
    args = build_parser(scenario, ssd_params, description).parse_args(argv)
    method = methods.REGISTRY[args.method]
    if method.uses_alpha:
        if args.alpha is None or args.lam is None:
            default_alpha, default_lam = ssd_defaults(ssd_params, args.net, args.dataset, scenario)
            args.alpha = default_alpha if args.alpha is None else args.alpha
            args.lam = default_lam if args.lam is None else args.lam
        if not (args.alpha >= 0 and args.lam >= 0):
            raise UserError(f"alpha and lambda must be >= 0, got alpha={args.alpha}, lambda={args.lam} "
                            f"(pass non-negative --alpha and --lambda)")
    hp = method.params(**{name: getattr(args, name) for name in method.param_names})
    if args.model_seed is None:
        args.model_seed = args.seed
    # every output is checked before the checkpoint and the data are loaded: a bad path costs no run
    results.check_writable(args.results)
    if args.importance_cache:
        check_output_dir(args.importance_cache, "--importance-cache")
    weights = Path(args.weights) if args.weights else find_checkpoint(args.checkpoint_dir, args.net, args.dataset,
                                                                     args.model_seed)
    if weights.is_dir():
        weights = weights / "model.pt"
    meta = load_meta(weights)
    data_args = (args.dataset, args.data_dir, meta["model_spec"]["image_size"], args.net == "vit",
                 meta.get("val_fraction", 0.1), meta.get("split_seed", 0))
    if data_cache is None and SHARED is not None:
        data_cache = SHARED["data"]
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
    hyper_names = set().union(*(m.param_names for m in methods.REGISTRY.values()))
    settings = {k: v for k, v in vars(args).items() if k not in hyper_names}  # flags of other methods stay out
    config = {"scenario": scenario, **settings, **asdict(hp), "forget_class": _forget_name(splits, args),
              "checkpoint_sha256": meta.get("sha256"), "model_spec": meta["model_spec"],
              "split_hash": splits.hash(), "recipe": meta["recipe"]}
    key = record_key(config)
    return Plan(scenario, args, meta, weights, data, splits, config, key, hp)


def run(scenario: str, ssd_params: dict, argv: list[str] | None = None, description: str = "") -> dict | None:
    """Plan, skip if already done or running elsewhere, else run, evaluate and record. Returns the record."""
    p = plan(scenario, ssd_params, argv, description)
    args = p.args
    what = f"{scenario} {args.method} seed {args.seed} (key {p.key})"
    if not args.force and p.key in results.done_keys(args.results, record_key):
        print(f"skip: {what} is already in {args.results} (--force reruns it)")
        return None
    with results.claim(args.results, p.key) as mine:
        if not mine:
            print(f"skip: {what} is running in another process")
            return None
        if not args.force and p.key in results.done_keys(args.results, record_key):  # finished while we planned
            return None
        return _run_claimed(p)


def _forget_name(splits: datasets.Splits, args) -> str | None:
    if splits.scenario == "full_class":
        return splits.data.classes[splits.forget_classes[0]]
    if splits.scenario == "sub_class":
        return splits.data.fine_classes[int(splits.data.train.fine[splits.forget_idx[0]])]
    return None


def run_context(p: Plan, device: torch.device) -> methods.RunContext:
    """What a method may know about its run besides its hyperparameters."""
    return methods.RunContext(device=device, seed=p.args.seed, batch_size=p.args.batch_size, amp=p.args.amp,
                              recipe=p.meta["recipe"], model_spec=p.meta["model_spec"],
                              pretrained=bool(p.meta.get("pretrained")), checkpoint_sha256=p.meta.get("sha256"),
                              importance_cache=p.args.importance_cache or None)


def _run_claimed(p: Plan) -> dict:
    args, scenario, meta, weights, splits, config, key = p.args, p.scenario, p.meta, p.weights, p.splits, p.config, p.key
    if args.deterministic:
        make_deterministic()
    seed_everything(args.seed)
    device = resolve_device(args.device)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    model = load_model(weights, meta).to(device)
    ctx = run_context(p, device)
    hyper = ", ".join(f"{k}={v}" for k, v in asdict(p.hp).items())
    print(f"{scenario}: {args.method} on {args.net}/{args.dataset}, forget {config['forget_class'] or ''} "
          f"({len(splits.forget_idx)} train samples), seed {args.seed}, {device}{'; ' + hyper if hyper else ''}")

    _sync(device)
    t0 = time.perf_counter()
    model, info = methods.REGISTRY[args.method].fn(model, splits, p.hp, ctx)
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
    _record(record, args.results)
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


def _record(record: dict, path: str) -> None:
    """Append the results line; if that fails for any reason, the finished result goes to a file of its own."""
    try:
        results.append(path, record)
    except Exception as e:
        problem = f"the result could not be appended to {path} ({type(e).__name__}: {e})"
        saved = results.save_fallback(record, path)
        if saved is None:  # nowhere to write at all: the line goes to the terminal, the one place left
            print(results.encode(record, default=str), end="")
            raise UserError(f"{problem}; no file could be written, so the record is printed above "
                            f"(copy that line into {path} once it is writable)") from None
        raise UserError(f"{problem}; the record is saved in {saved} "
                        f"(make {path} writable, then: cat {saved} >> {path})") from None


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(scenario: str, ssd_params: dict, description: str) -> None:
    run_cli(lambda: run(scenario, ssd_params, description=description) and None)
