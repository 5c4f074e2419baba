"""The command-line layer: argparse with one-line errors, the flags several entry points share, how a
script turns a UserError into `error: ...`, and the forget scripts' flags.

The forget scripts' flags map one to one onto the fields of runner.RunConfig and of the methods'
hyperparameter dataclasses (flag --batch-size is field batch_size), with the fields' defaults, so a
command line and a config built in Python mean the same thing. Here values are only converted from
text; RunConfig.resolve checks their ranges and choices, once, for both. Nothing here runs anything:
runner.RunConfig.from_argv and RunConfig.to_argv call in.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import fields

from common import Number, UserError, device_string, seed_int


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one `error: <problem> (<fix>)` line and status 2, no usage
    dump. A numeric flag declared with plain `type=int` or `type=float` must still be finite and >= 0;
    flags with another range declare it with `Number(...)`."""

    def error(self, message: str):
        raise UserError(message if message.endswith(")") else f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        for action in self._actions:
            if action.type in (int, float):
                values = getattr(parsed, action.dest, None)
                for v in values if isinstance(values, list) else [values]:
                    if v is not None and not (math.isfinite(v) and v >= 0):
                        self.error(f"argument {'/'.join(action.option_strings)}: {v} is not a finite number "
                                   f">= 0 (pass a non-negative value)")
        return parsed, extra


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks (usage examples) and shows each default once: not when the
    help already speaks of its default, and not for None, a switch that is off, or a suppressed default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if ("default" in help or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return help
        return help + " (default: %(default)s)"


def run_cli(main, *args) -> None:
    """Run a script's main: a UserError becomes `error: ...` and exit status 2, never a traceback."""
    try:
        code = main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; results and checkpoints hold only completed work", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    sys.exit(code if isinstance(code, int) else 0)


# Flags that several entry points share: declared here once, added with add_shared_flags.
SHARED_FLAGS = {
    "net": (("--net", "-net"), dict(default="resnet18", help="architecture (resnet18 or vit)")),
    "dataset": (("--dataset", "-dataset"), dict(default="digits", help="dataset (digits and digits5 are embedded "
                                                                         "and need no download)")),
    "seed": (("--seed", "-seed"), dict(type=seed_int, default=0, help="seeds python, numpy and torch")),
    "device": (("--device",), dict(default="auto", type=device_string, help="auto, cpu, cuda or cuda:N")),
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


def add_shared_flags(parser: argparse.ArgumentParser, *names: str, convert_only: bool = False, **defaults) -> None:
    """Add the named shared flags; keyword arguments override a flag's default (or help, as `<name>_help`).
    `convert_only` leaves range, device and choice checks to the caller (RunConfig.resolve): the choices
    are shown, not enforced."""
    import datasets  # imported here: make_tables and friends use this module without torch
    import models

    choices = {"net": models.NETS, "dataset": datasets.DATASETS}
    for name in names:
        flags, kwargs = SHARED_FLAGS[name]
        kwargs = dict(kwargs)
        if name in choices:
            kwargs["metavar" if convert_only else "choices"] = _shown(choices[name]) if convert_only else choices[name]
        if convert_only and kwargs.get("type") is device_string:
            del kwargs["type"]
        if convert_only and isinstance(kwargs.get("type"), Number):
            kwargs["type"] = kwargs["type"].parse
        if name in defaults:
            kwargs["default"] = defaults[name]
        if f"{name}_help" in defaults:
            kwargs["help"] = defaults[f"{name}_help"]
        parser.add_argument(*flags, **kwargs)


def _shown(choices) -> str:
    return "{" + ",".join(choices) + "}"


# --- the forget scripts ---------------------------------------------------------------------------

def forget_parser(scenario: str, defaults: dict | None, ssd_params: dict | None = None,
                  description: str = "") -> ArgumentParser:
    """The flags of a forget script. `defaults` maps each RunConfig field to its default for this
    scenario; None gives a parser that returns only the flags given (the driver's overrides)."""
    import methods  # imported here: see add_shared_flags
    import results

    def default(name, fallback=None):
        return argparse.SUPPRESS if defaults is None else defaults.get(name, fallback)

    epilog = None
    if ssd_params:
        shown = "; ".join(f"{'/'.join(k) if isinstance(k, tuple) else k} ({a:g}, {lam:g})"
                          for k, (a, lam) in ssd_params.items())
        epilog = f"SSD_PARAMS of this script, (alpha, lambda) by net or net/dataset: {shown}"
    p = ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
    a = p.add_argument
    add_shared_flags(p, "net", "dataset", convert_only=True, net=default("net"), dataset=default("dataset"),
                     dataset_help="dataset the checkpoint was trained on (digits/digits5 are embedded and need no "
                                  "download)", net_help="architecture of the checkpoint")
    if scenario != "random":
        what = "fine class (e.g. rocket, mushroom, baby, lamp, sea; or three for digits5)" \
            if scenario == "sub_class" else "class or superclass (e.g. rocket, vehicle2, veg, people; or three for digits)"
        a("--forget-class", "-forget_class", default=default("forget_class"),
          help=f"name or index of the {what} to forget (required)")
    else:
        a("--forget-count", type=Number(int).parse, default=default("forget_count"),
          help="number of random training samples to forget (default 100; not with --forget-fraction)")
        a("--forget-fraction", type=Number(float).parse, default=default("forget_fraction"),
          help="fraction to forget, split as torch's random_split does: the paper's 0.00165 gives 83 of 50,000 "
               "samples, not 100")
        a("--forget-seed", type=seed_int.parse, default=default("forget_seed"),
          help="seed that draws the forget set (default: --seed); fix it to forget the same samples from "
               "originals of different seeds")
    a("--method", "-method", default=default("method"), metavar=_shown(sorted(methods.REGISTRY)),
      help="unlearning method")
    a("--weights", "-weight_path", default=default("weights"),
      help="model.pt of the original model (its meta.json lies beside it); by default the checkpoint "
           "whose metadata matches --net, --dataset and --model-seed is taken from --checkpoint-dir")
    add_shared_flags(p, "checkpoint_dir", "seed", convert_only=True, checkpoint_dir=default("checkpoint_dir"),
                     seed=default("seed"), seed_help="seeds python, numpy and torch; also the random split's seed "
                                                     "unless --forget-seed is given")
    a("--model-seed", type=seed_int.parse, default=default("model_seed"),
      help="training seed of the checkpoint to look up (default: --seed)")
    a("--batch-size", "-b", type=Number(int).parse, default=default("batch_size"),
      help="batch size of the importance passes and of methods that train (the paper code's -b: 64 for the "
           "class scenarios, 128 for random forgetting)")
    a("--eval-batch-size", type=Number(int).parse, default=default("eval_batch_size"),
      help="batch size of evaluation (metrics do not depend on it; on a CPU, 512 ran 1.5x slower per image than 64-256)")
    add_shared_flags(p, "device", "data_dir", "no_download", "results", convert_only=True,
                     **{k: default(k) for k in ("device", "data_dir", "no_download", "results")})
    a("--separate-records", action="store_true", default=default("separate_records", False),
      help="write the record to a file of its own, <results>.d/<key>.jsonl, instead of appending to --results "
           "under a lock (cluster tasks on a file system without working locks); readers merge both")
    a("--force", action="store_true", default=default("force", False),
      help="run even if this exact run is already in the results")
    a("--importance-cache", default=default("importance_cache"), help="folder of cached full-data importances")
    a("--no-importance-cache", dest="importance_cache", action="store_const", const="",
      default=default("importance_cache"), help="always recompute SSD's importance on the full training set")
    add_shared_flags(p, "amp", "deterministic", convert_only=True, amp=default("amp", False),
                     deterministic=default("deterministic", False))
    a("--wandb", default=default("wandb"), metavar=_shown(results.WANDB_MODES),
      help="wandb mode; auto is online when WANDB_API_KEY is set, else offline")
    a("--wandb-project", default=default("wandb_project"), help="wandb project (default: <net>-<dataset>-<scenario>)")
    group = p.add_argument_group("method hyperparameters (each method reads only its own)")
    seen = set()
    for method in methods.REGISTRY.values():
        for f in fields(method.params):
            if f.name in seen:  # a field several methods share (alpha, retrain_epochs) is one flag
                continue
            seen.add(f.name)
            meta = dict(f.metadata)
            kind = meta.get("type", type(f.default))
            kwargs = {"dest": f.name, "help": meta["help"],
                      "default": default(f.name, meta.get("by_scenario", {}).get(scenario, f.default))}
            if kind is not str:
                kwargs["type"] = kind.parse if isinstance(kind, Number) else kind
            if "choices" in meta:
                kwargs["metavar"] = _shown(meta["choices"])
            group.add_argument(meta.get("flag", "--" + f.name.replace("_", "-")), **kwargs)
    return p


def forget_argv(parser: argparse.ArgumentParser, values: dict, always: tuple[str, ...]) -> list[str]:
    """The flags that give `values` (fields -> values): each value that differs from its flag's default,
    and the fields in `always` (those that name a run) even at their defaults."""
    argv, done = [], set()
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or dest in done or dest not in values:
            continue
        value = values[dest]
        if action.nargs == 0:  # a switch, or a flag with a constant (--no-importance-cache)
            if value == action.const and value != action.default:
                argv.append(action.option_strings[0])
                done.add(dest)
        elif value is not None and (value != action.default or dest in always):
            argv += [action.option_strings[0], str(value)]
            done.add(dest)
    flagged = {action.dest for action in parser._actions}
    stray = [k for k, v in values.items() if v is not None and k not in flagged]
    if stray:
        raise UserError(f"{', '.join(stray)} has no flag in this script (leave it None for this scenario)")
    return argv
