"""One forget run: RunConfig, the whole description of a run, and execute, which runs it.

    RunConfig --resolve--> every default filled in, every value checked (once, here)
              --plan-----> checkpoint + meta.json, data and splits, the run's key
              --execute--> method (timed alone) -> metrics (timed apart) -> one record -> wandb

    from runner import RunConfig, execute
    record = execute(RunConfig("full_class", forget_class="three", method="ssd", seed=1))

The forget_*_main.py scripts build their RunConfig with RunConfig.from_argv (the flags live in
cli.py), and config.to_argv() gives the command line of a config. Nothing here parses argv or exits.
"""
from __future__ import annotations

import ast
import contextlib
import datetime as dt
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

import cli
import datasets
import methods
import metrics
import models
import results
from common import (Number, UserError, check_device, check_output_dir, fraction, git_commit, library_versions,
                    make_deterministic, positive_int, resolve_device, seed_everything, seed_int)

HERE = Path(__file__).resolve().parent
SCRIPTS = {"full_class": "forget_full_class_main.py", "sub_class": "forget_sub_class_main.py",
           "random": "forget_random_main.py"}


def scenario_defaults(scenario: str) -> dict:
    """The defaults that depend on the scenario: the embedded dataset, and the paper code's -b."""
    return {"dataset": "digits5" if scenario == "sub_class" else "digits",
            "batch_size": 128 if scenario == "random" else 64}


def script_ssd_params(scenario: str) -> dict:
    """SSD_PARAMS as written at the top of the scenario's task script, read from its source: the values
    users edit there, without importing (and so running) the script."""
    path = HERE / SCRIPTS[scenario]
    for node in ast.parse(path.read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "SSD_PARAMS":
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                raise UserError(f"SSD_PARAMS in {path.name} is not a plain dict of numbers (write its values out, "
                                f"or pass alpha and lambda)") from None
    raise UserError(f"{path.name} has no SSD_PARAMS (restore it, or pass alpha and lambda)")


# Checks of the run's own fields; the method's hyperparameters carry theirs in methods.py.
RANGES = {"seed": seed_int, "model_seed": seed_int, "batch_size": positive_int, "eval_batch_size": positive_int,
          "forget_count": positive_int, "forget_fraction": fraction, "forget_seed": seed_int}
SWITCHES = ("no_download", "separate_records", "force", "amp", "deterministic")
TEXTS = ("weights", "checkpoint_dir", "data_dir", "results", "importance_cache", "wandb_project")
NAMING = ("net", "dataset", "method", "seed")  # always on a command line, so that it says which run it is


@dataclass
class RunConfig:
    """Everything that defines one forget run, and where it reads and writes. None means "the default",
    which `resolve` fills in."""

    scenario: str  # full_class, sub_class or random
    method: str = "ssd"
    hp: object = None  # the method's hyperparameters, its dataclass in methods.py (None: its defaults)
    net: str = "resnet18"
    dataset: str | None = None  # digits, or digits5 for sub_class
    forget_class: str | None = None  # class scenarios: a name or an index
    forget_count: int | None = None  # random forgetting: how many samples (100 unless a fraction is given)
    forget_fraction: float | None = None
    # random forgetting: the seed that draws the forget set (None: seed), so that runs on several originals
    # (several run seeds) can forget the same samples
    forget_seed: int | None = None
    seed: int = 0  # seeds python, numpy and torch, and the random split unless forget_seed is given
    model_seed: int | None = None  # training seed of the checkpoint to look up (default: seed)
    weights: str | None = None  # a model.pt; by default the checkpoint_dir entry whose meta.json matches
    checkpoint_dir: str = "runs/pretrain"
    batch_size: int | None = None  # importances and training: 64, or 128 for random forgetting
    eval_batch_size: int = 256
    device: str = "auto"
    data_dir: str = "data"
    no_download: bool = False
    results: str = "runs/results.jsonl"
    separate_records: bool = False  # the record in <results>.d/<key>.jsonl instead of a locked append
    force: bool = False  # run even if the key is already recorded
    importance_cache: str = "runs/importance_cache"  # "" turns the cache off
    amp: bool = False
    deterministic: bool = False
    wandb: str = "auto"
    wandb_project: str | None = None

    @classmethod
    def from_argv(cls, scenario: str, argv: list[str] | None = None, ssd_params: dict | None = None,
                  description: str = "") -> RunConfig:
        """The resolved config of a task script's command line; `ssd_params` is the script's SSD_PARAMS."""
        values = vars(cli.forget_parser(scenario, parser_defaults(scenario), ssd_params, description).parse_args(argv))
        method = methods.REGISTRY.get(values["method"])
        hp = method.params(**{n: values[n] for n in method.param_names}) if method else None
        for f in {f.name: f for m in methods.REGISTRY.values() for f in fields(m.params)}.values():
            if values[f.name] is not None and (method is None or f.name not in method.param_names):
                _check_hyper(f, values[f.name])  # another method's flag: unused, but a bad value is a mistake
        config = cls(scenario, hp=hp, **{f.name: values.get(f.name) for f in fields(cls)
                                         if f.name not in ("scenario", "hp")})
        return config.resolve(ssd_params)

    def to_argv(self) -> list[str]:
        """The task script's flags for this config (`python <SCRIPTS[scenario]> <flags>` runs it): every value
        that differs from its default, and net, dataset, method and seed."""
        _check_choice(self.scenario, datasets.SCENARIOS, "scenario")
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("scenario", "hp")}
        values.update(asdict(self.hp) if self.hp is not None else {})
        return cli.forget_argv(cli.forget_parser(self.scenario, parser_defaults(self.scenario)), values, NAMING)

    def to_dict(self) -> dict:
        """Plain data (JSON), for a worker process; from_dict reverses it."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)},
                "hp": asdict(self.hp) if self.hp is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        hp = d.get("hp")
        return cls(**{**d, "hp": methods.REGISTRY[d["method"]].params(**hp) if hp is not None else None})

    def resolve(self, ssd_params: dict | None = None) -> RunConfig:
        """This config with every default filled in and every value checked: the one place where both
        happen. Alpha and lambda default to `ssd_params`, the task script's SSD_PARAMS (read from the
        script when not given); model_seed to seed. Raises UserError."""
        _check_choice(self.scenario, datasets.SCENARIOS, "scenario")
        _check_choice(self.method, methods.REGISTRY, "method")
        v = {f.name: getattr(self, f.name) for f in fields(self)}
        v.update({k: d for k, d in scenario_defaults(self.scenario).items() if v[k] is None})
        _check_forget_request(v)
        for name, rng in RANGES.items():
            if v[name] is not None:
                v[name] = rng.check(v[name], _named(name))
        v["model_seed"] = v["seed"] if v["model_seed"] is None else v["model_seed"]
        _check_choice(v["net"], models.NETS, "net")
        _check_choice(v["dataset"], datasets.DATASETS, "dataset")
        _check_choice(v["wandb"], results.WANDB_MODES, "wandb")
        for name in SWITCHES:
            if not isinstance(v[name], bool):
                raise UserError(f"{_named(name)}: {v[name]!r} is not True or False (pass a bool)")
        for name in TEXTS:
            if v[name] is not None and not isinstance(v[name], (str, Path)):
                raise UserError(f"{_named(name)}: {v[name]!r} is not a path or a name (pass a string)")
            v[name] = None if v[name] is None else str(v[name])
        v["importance_cache"] = v["importance_cache"] or ""
        if not isinstance(v["device"], str):
            raise UserError(f"{_named('device')}: {v['device']!r} is not a device name (pass e.g. 'cpu' or 'cuda')")
        check_device(v["device"])
        v["hp"] = _resolve_hp(self.scenario, v, ssd_params)
        return RunConfig(**v)


def parser_defaults(scenario: str) -> dict:
    """Each field's default on the command line of `scenario`'s script."""
    return {**{f.name: f.default for f in fields(RunConfig)}, **scenario_defaults(scenario)}


def _named(name: str, flag: str | None = None) -> str:
    return f"{name} ({flag or '--' + name.replace('_', '-')})"


def _check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise UserError(f"{_named(name)}: {value!r} is not one of {', '.join(choices)} (pass one of them)")


def _check_forget_request(v: dict) -> None:
    """Which forget fields the scenario takes: a class for the class scenarios, a count or a fraction for random."""
    scenario, forget_class = v["scenario"], v["forget_class"]
    if scenario == "random":
        if forget_class is not None:
            raise UserError(f"random forgetting draws its samples and takes no forget_class, got {forget_class!r} "
                            f"(pass forget_count or forget_fraction, or use scenario full_class)")
        if v["forget_count"] is not None and v["forget_fraction"] is not None:
            raise UserError("forget_count (--forget-count) and forget_fraction (--forget-fraction) exclude each "
                            "other (pass one of them)")
        return
    if v["forget_count"] is not None or v["forget_fraction"] is not None or v["forget_seed"] is not None:
        raise UserError(f"{scenario} forgetting takes forget_class, not forget_count, forget_fraction or "
                        f"forget_seed (drop them, or use scenario random)")
    if forget_class is None or isinstance(forget_class, bool) or not isinstance(forget_class, (str, int)):
        raise UserError(f"{scenario} forgetting needs forget_class (--forget-class), a class name or index, got "
                        f"{forget_class!r} (pass e.g. --forget-class three)")
    v["forget_class"] = str(forget_class)


def _resolve_hp(scenario: str, v: dict, ssd_params: dict | None):
    """The method's hyperparameters with the scenario's and the script's defaults filled in, each checked
    against the range or choices declared beside it in methods.py."""
    method = methods.REGISTRY[v["method"]]
    hp = v["hp"] if v["hp"] is not None else method.params()
    if type(hp) is not method.params:
        raise UserError(f"hp is a {type(hp).__name__}, but {v['method']} takes methods.{method.params.__name__} "
                        f"(pass one, or None for its defaults)")
    values = asdict(hp)
    if method.uses_alpha and (values["alpha"] is None or values["lam"] is None):
        params = script_ssd_params(scenario) if ssd_params is None else ssd_params
        found = params.get((v["net"], v["dataset"]), params.get(v["net"]))
        if found is None:
            script = SCRIPTS[scenario]
            raise UserError(f"{script} has no SSD_PARAMS entry for net {v['net']!r} (add {v['net']!r}: (alpha, "
                            f"lambda) to SSD_PARAMS at the top of {script}, or pass both --alpha and --lambda)")
        values["alpha"] = found[0] if values["alpha"] is None else values["alpha"]
        values["lam"] = found[1] if values["lam"] is None else values["lam"]
    for f in fields(hp):
        value = values[f.name]
        if value is None:
            value = values[f.name] = f.metadata.get("by_scenario", {}).get(scenario)
        if value is not None or f.default is not None:
            values[f.name] = _check_hyper(f, value)
    return method.params(**values)


def _check_hyper(f, value):
    """A hyperparameter's value against the range (a common.Number, else finite and >= 0) or the choices
    declared beside it in methods.py; returned as its type."""
    meta = f.metadata
    name = _named(f.name, meta.get("flag"))
    kind = meta.get("type", type(f.default))
    if kind is not str:
        return (kind if isinstance(kind, Number) else Number(kind, 0)).check(value, name)
    if not isinstance(value, str) or value not in meta.get("choices", [value]):
        raise UserError(f"{name}: {value!r} is not one of {', '.join(meta.get('choices', []))} (pass one of them)")
    return value


# Fields of a run's config that define it for every method; the chosen method's own hyperparameters
# complete its key. Nothing else goes in, so a new flag for another method changes no existing key.
COMMON_KEY = ("scenario", "method", "net", "dataset", "forget_class", "forget_count", "forget_fraction", "seed",
              "model_seed", "batch_size", "amp", "checkpoint_sha256", "model_spec", "split_hash", "recipe")


def record_key(config: dict) -> str | None:
    """A stored run's key under today's rule, recomputed from its config (None for an unknown method).
    forget_seed joins the key only when it is set: runs without it keep the keys they were recorded under."""
    method = methods.REGISTRY.get(config.get("method"))
    drawn_by = ("forget_seed",) if config.get("forget_seed") is not None else ()
    return None if method is None else results.run_key(config, COMMON_KEY + drawn_by + tuple(method.param_names))


@dataclass
class Cache:
    """What consecutive runs in one process may share (the driver's worker, a cluster task): loaded datasets,
    keyed by the arguments that define them, and the weights of the last checkpoint, keyed by path and
    sha256. Every run still builds a fresh model and loads these weights into it; they are only read."""

    data: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)


def check_meta(meta: dict, config: RunConfig, data: datasets.Data) -> None:
    for name, want in (("net", config.net), ("dataset", config.dataset)):
        if meta.get(name) != want:
            raise UserError(f"checkpoint was trained with {name}={meta.get(name)!r} but --{name} is {want!r} "
                            f"(pass --{name} {meta.get(name)} or another --weights)")
    if meta["model_spec"]["num_classes"] != data.num_classes:
        raise UserError(f"checkpoint has {meta['model_spec']['num_classes']} classes but {data.name} has "
                        f"{data.num_classes} (use the checkpoint trained on {data.name})")
    if meta.get("split_hash") and meta["split_hash"] != data.split_hash():
        raise UserError(f"the train/validation split rebuilt for {data.name} differs from the checkpoint's "
                        f"(the data changed since pretraining; re-run pretrain_model.py)")


@dataclass
class Plan:
    """Everything about a run that is known before it runs, including its results key."""

    config: RunConfig  # resolved
    meta: dict
    weights: Path
    data: datasets.Data
    splits: datasets.Splits
    record_config: dict  # the "config" of its record: the run's fields, hyperparameters and checkpoint
    key: str


def plan(config: RunConfig, cache: Cache | None = None) -> Plan:
    """Resolve the config, check the outputs, find the checkpoint, build the split and the key. Nothing is
    trained; every output is checked before the checkpoint and the data are loaded."""
    c = config.resolve()
    results.check_writable(c.results, separate=c.separate_records)
    if c.importance_cache:
        check_output_dir(c.importance_cache, "--importance-cache")
    weights = Path(c.weights or models.find_checkpoint(c.checkpoint_dir, c.net, c.dataset, c.model_seed))
    if weights.is_dir():
        weights = weights / "model.pt"
    meta = models.load_meta(weights)
    data_args = (c.dataset, c.data_dir, meta["model_spec"]["image_size"], c.net == "vit",
                 meta.get("val_fraction", 0.1), meta.get("split_seed", 0))
    data = cache.data.get(data_args) if cache is not None else None
    if data is None:
        data = datasets.build_data(*data_args[:2], image_size=data_args[2], vit=data_args[3],
                                   val_fraction=data_args[4], split_seed=data_args[5], download=not c.no_download)
        if cache is not None:
            cache.data[data_args] = data
    check_meta(meta, c, data)
    split_seed = c.seed if c.forget_seed is None else c.forget_seed
    splits = datasets.build_splits(c.scenario, data, c.forget_class, seed=split_seed, forget_count=c.forget_count,
                                   forget_fraction=c.forget_fraction)
    record_config = {**{f.name: getattr(c, f.name) for f in fields(c) if f.name != "hp"}, **asdict(c.hp),
                     "forget_class": _forget_name(splits), "checkpoint_sha256": meta.get("sha256"),
                     "model_spec": meta["model_spec"], "split_hash": splits.hash(), "recipe": meta["recipe"]}
    return Plan(c, meta, weights, data, splits, record_config, record_key(record_config))


def execute(config: RunConfig, cache: Cache | None = None) -> dict | None:
    """Plan the run; if its key is already recorded, return that record; else run the method, evaluate,
    record and return the new record. None: another process on this machine runs it right now. Bad
    input raises UserError before anything is loaded; this never exits."""
    p = plan(config, cache)
    c = p.config
    what = f"{c.scenario} {c.method} seed {c.seed} (key {p.key})"
    done = None if c.force else results.find(c.results, p.key, record_key)
    if done is not None:
        print(f"skip: {what} is already in {c.results} (--force reruns it)")
        return done
    if c.separate_records:  # no lock to rely on: a duplicate task rewrites the same file with the same run
        return _run(p, cache)
    with results.claim(c.results, p.key) as mine:
        if not mine:
            print(f"skip: {what} is running in another process")
            return None
        done = None if c.force else results.find(c.results, p.key, record_key)  # finished while we planned
        return done if done is not None else _run(p, cache)


def _forget_name(splits: datasets.Splits) -> str | None:
    if splits.scenario == "full_class":
        return splits.data.classes[splits.forget_classes[0]]
    if splits.scenario == "sub_class":
        return splits.data.fine_classes[int(splits.data.train.fine[splits.forget_idx[0]])]
    return None


def run_context(p: Plan, device: torch.device) -> methods.RunContext:
    """What a method may know about its run besides its hyperparameters."""
    c = p.config
    return methods.RunContext(device=device, seed=c.seed, batch_size=c.batch_size, amp=c.amp,
                              recipe=p.meta["recipe"], model_spec=p.meta["model_spec"],
                              pretrained=bool(p.meta.get("pretrained")), checkpoint_sha256=p.meta.get("sha256"),
                              importance_cache=c.importance_cache or None)


@contextlib.contextmanager
def _torch_switches_kept():
    """--deterministic changes process-wide torch switches; they are put back after the run, so that the
    next run in the same process (a worker, a cluster task) starts as it would in a new one."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2:]


def _run(p: Plan, cache: Cache | None) -> dict:
    c, hp, meta, splits = p.config, p.config.hp, p.meta, p.splits
    with _torch_switches_kept():
        if c.deterministic:
            make_deterministic()
        seed_everything(c.seed)
        device = resolve_device(c.device)
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        model = models.load_checkpoint(p.weights, meta, cache.weights if cache is not None else None).to(device)
        shown = ", ".join(f"{k}={v}" for k, v in asdict(hp).items())
        print(f"{c.scenario}: {c.method} on {c.net}/{c.dataset}, forget {p.record_config['forget_class'] or ''} "
              f"({len(splits.forget_idx)} train samples), seed {c.seed}, {device}{'; ' + shown if shown else ''}")

        _sync(device)
        t0 = time.perf_counter()
        model, info = methods.REGISTRY[c.method].fn(model, splits, hp, run_context(p, device))
        _sync(device)
        method_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        random_model = models.initial(meta["model_spec"], pretrained=False, seed=c.seed + 2).to(device)
        per_example = {}
        m = metrics.evaluate(model, splits, device, random_model, c.eval_batch_size, c.amp, per_example)
        eval_s = time.perf_counter() - t0

    times = {"method_s": method_s, "eval_s": eval_s, **{k: v for k, v in info.items() if k.endswith("_s")}}
    record = {"key": p.key, "config": p.record_config, "metrics": m, "times": times,
              "method_info": {k: v for k, v in info.items() if not k.endswith("_s")},
              "checkpoint": {"path": str(p.weights), "sha256": meta.get("sha256"), "train_seed": meta.get("seed"),
                             "val_acc": meta.get("val_acc"), "test_acc": meta.get("test_acc")},
              "git": git_commit(), "versions": library_versions(), "started": started,
              "host": socket.gethostname(),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    lost = None
    try:  # before the record, so that a recorded run has its side file; losing it costs only that file
        record["examples"] = results.examples_path(c.results, p.key).name
        results.save_examples(c.results, p.key, per_example)
    except Exception as e:
        record["examples"], lost = None, f"{type(e).__name__}: {e}"
    _record(record, c)
    if lost:  # said once the record is safe, so that a failing record still ends in one error line
        print(f"warning: the per-example file could not be written ({lost}); the run is recorded without it",
              file=sys.stderr)
    dampened = f"  dampened {100 * info['dampened_fraction']:.3f}%" if "dampened_fraction" in info else ""
    if "search_status" in info:  # ssd_search says whether it reached its target
        dampened += f"  {info['search_status']} ({info['search_steps']} steps)"
    print(f"Df {_fmt(m['df'])}  retain-test {_fmt(m['retain_test_acc'])}  test {_fmt(m['test_acc'])}  "
          f"MIA {_fmt(m['mia'])}  ZRF {m.get('zrf', float('nan')):.3f}{dampened}  method {method_s:.2f}s  "
          f"eval {eval_s:.2f}s")
    if info.get("dampened") == 0 and "chosen_alpha" not in info:  # assd and ssd_search choose alpha themselves
        print(f"warning: alpha={hp.alpha} selects nothing: the largest I_Df/I_D is {info['max_ratio']:.3g} "
              f"(the cap |D|/|D_f| is {info['ratio_cap']:.3g}); the model is unchanged (pass a smaller --alpha)",
              file=sys.stderr)
    if info.get("search_status") == "target_unreachable":
        print(f"warning: ssd_search cannot bring forget-train accuracy to {info['target_forget_train_acc']:.2f} "
              f"with lambda=1 anywhere on its grid (it reached {info['forget_train_acc']:.2f}; the largest I_Df/I_D is "
              f"{info['max_ratio']:.3g}): D_f's gradients are too small to select or dampen enough", file=sys.stderr)
    try:
        results.log_wandb(record, c.wandb_project or f"{c.net}-{c.dataset}-{c.scenario}",
                          group=str(p.record_config["forget_class"] or f"random{len(splits.forget_idx)}"),
                          name=c.method, mode=c.wandb, run_dir=Path(c.results).parent)
    except Exception as e:  # the record is already safe; tracking must not lose it
        print(f"warning: wandb logging failed: {type(e).__name__}: {e}", file=sys.stderr)
    return record


def _record(record: dict, c: RunConfig) -> None:
    """Append the results line (or write the run's own file); if that fails for any reason, the finished
    result goes to a fallback file."""
    path = c.results
    try:
        (results.write_record if c.separate_records else results.append)(path, record)
    except Exception as e:
        where = f"written beside {path}" if c.separate_records else f"appended to {path}"
        problem = f"the result could not be {where} ({type(e).__name__}: {e})"
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
    """A task script's entry: its command line, its SSD_PARAMS, one run."""
    cli.run_cli(lambda: execute(RunConfig.from_argv(scenario, None, ssd_params, description)) and None)
