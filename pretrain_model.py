"""Train an original model: the one that later forgets.

Writes <out>/model.pt (the state dict) and <out>/meta.json (everything needed to rebuild the model
and its data split), both atomically. The checkpoint is selected on a validation split carved
from the training set; the paper's code selected on the test set (--select-on-test restores that).

    python pretrain_model.py --net resnet18 --dataset cifar100 --seed 1
    python pretrain_model.py --net resnet18 --dataset digits --width 16      # CPU demo, ~40 s
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import datasets
import models
import training
from torch.utils.data import Subset
from cli import ArgumentParser, HelpFormatter, add_shared_flags, run_cli
from common import (Number, UserError, atomic_torch_save, atomic_write_json, check_output_dir, file_sha256,
                    git_commit, library_versions, make_deterministic, non_negative_float, non_negative_int,
                    positive_float, positive_int, resolve_device, seed_everything, seed_int)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    add_shared_flags(p, "net", "dataset", "seed", dataset_help="training data (digits and digits5 are embedded "
                                                              "and need no download)",
                     seed_help="training seed (python, numpy, torch)")
    a("--width", type=Number(int, 1, 1024), default=64, help="ResNet18 base width; 64 is the standard 11.2 M model")
    a("--vit-config", default="base", choices=sorted(models.VIT_CONFIGS),
      help="ViT size: base is ViT-B/16 (ImageNet weights by name), tiny is offline and small")
    a("--vit-name", default=models.VIT_DEFAULT_NAME, help="pretrained ViT to fine-tune (with --vit-config base)")
    a("--no-pretrained", action="store_true", help="train a ViT-base from random weights instead")
    a("--image-size", type=Number(int, 8, 1024), default=None, help="input size (default: 224 for ViT-base, else 32)")
    a("--epochs", type=positive_int, default=None, help="epochs (default: the paper's table for net and dataset)")
    a("--milestones", type=positive_int, nargs="*", default=None, help="epochs where lr is multiplied by --gamma")
    a("--lr", type=positive_float, default=None, help="SGD learning rate (default: 0.1, the paper's; 0.05 on digits)")
    a("--momentum", type=Number(float, 0, 1, high_open=True), default=None, help="SGD momentum (default: 0.9)")
    a("--weight-decay", type=non_negative_float, default=None, help="weight decay (default: 5e-4)")
    a("--batch-size", "-b", type=positive_int, default=None, help="training batch size (default: 64)")
    a("--warmup-epochs", type=non_negative_int, default=None, help="epochs of linear lr warm-up (default: 1)")
    a("--gamma", type=positive_float, default=None, help="lr factor at each milestone (default: 0.2)")
    a("--val-fraction", type=Number(float, 0, 1, high_open=True), default=0.1,
      help="stratified share of the training set held out for selection")
    a("--split-seed", type=seed_int, default=0, help="seed of the validation split (fixed, so every model shares it)")
    a("--select-on-test", action="store_true",
      help="the paper code's behaviour: no validation split, select the checkpoint on the test set")
    a("--out", default=None, help="output folder (default: <checkpoint-dir>/<net>-<dataset>-seed<seed>)")
    add_shared_flags(p, "checkpoint_dir", checkpoint_dir_help="parent folder of the default --out")
    a("--force", action="store_true", help="retrain even if --out already holds a checkpoint")
    add_shared_flags(p, "data_dir", "no_download", "device", "amp", "deterministic",
                     amp_help="bf16 autocast while training and evaluating")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = Path(args.out or Path(args.checkpoint_dir) / f"{args.net}-{args.dataset}-seed{args.seed}")
    if (out / "meta.json").is_file() and (out / "model.pt").is_file() and not args.force:
        print(f"{out} already holds a checkpoint; nothing to do (--force retrains)")
        return out
    check_output_dir(out, "--out")  # before anything trains: the checkpoint must have somewhere to go
    for name in ("model.pt", "meta.json"):
        if (out / name).is_dir():
            raise UserError(f"--out: {out / name} is a folder (remove it, or pass another --out)")
    if args.deterministic:
        make_deterministic()
    seed_everything(args.seed)
    device = resolve_device(args.device)
    pretrained = args.net == "vit" and args.vit_config == "base" and not args.no_pretrained
    image_size = args.image_size or (224 if args.net == "vit" and args.vit_config == "base" else 32)
    if pretrained and image_size != 224:
        raise UserError(f"the pretrained ViT-B/16 takes 224x224 inputs, not {image_size} (drop --image-size)")
    patch = models.VIT_CONFIGS[args.vit_config]["patch_size"]
    if args.net == "vit" and image_size % patch:
        raise UserError(f"ViT-{args.vit_config} cuts images into {patch}x{patch} patches, so --image-size "
                        f"{image_size} does not fit (pass a multiple of {patch})")
    val_fraction = 0.0 if args.select_on_test else args.val_fraction
    data = datasets.build_data(args.dataset, args.data_dir, image_size, vit=args.net == "vit",
                               val_fraction=val_fraction, split_seed=args.split_seed, download=not args.no_download)
    spec = models.make_spec(args.net, data.num_classes, image_size, args.width, args.vit_config, args.vit_name)
    model = models.initial(spec, pretrained, seed=args.seed).to(device)

    recipe = training.pretrain_recipe(args.net, args.dataset)
    for field in ("epochs", "milestones", "lr", "momentum", "weight_decay", "batch_size", "warmup_epochs", "gamma"):
        if getattr(args, field) is not None:
            setattr(recipe, field, getattr(args, field))
    train_set = Subset(data.train_aug, data.train_idx.tolist())
    select_set = data.test if args.select_on_test else Subset(data.train, data.val_idx.tolist())
    select_name = "test" if args.select_on_test else "validation"
    print(f"pretraining {args.net} ({models.count_parameters(model):,} parameters) on {args.dataset}: "
          f"{len(train_set)} train, {len(data.val_idx)} validation, {len(data.test)} test images, {device}")
    t0 = time.perf_counter()
    model, best = training.train_and_select(model, train_set, recipe, device, select_set, seed=args.seed,
                                            amp=args.amp, desc="pretrain")
    train_s = time.perf_counter() - t0
    test_acc = training.accuracy(*training.predict(model, data.test, device))

    atomic_torch_save({k: v.cpu() for k, v in model.state_dict().items()}, out / "model.pt")
    meta = {"net": args.net, "dataset": args.dataset, "seed": args.seed, "model_spec": spec, "pretrained": pretrained,
            "classes": data.classes, "image_size": image_size, "recipe": recipe.as_dict(),
            "val_fraction": val_fraction, "split_seed": args.split_seed, "split_hash": data.split_hash(),
            "selected_on": select_name, "best_epoch": best["best_epoch"],
            "val_acc": None if args.select_on_test else best["selection_acc"],
            "test_acc": test_acc, "train_s": train_s, "sha256": file_sha256(out / "model.pt"),
            "versions": library_versions(), "git": git_commit(), "device": str(device),
            "deterministic": args.deterministic}
    atomic_write_json(out / "meta.json", meta)
    print(f"saved {out}/model.pt: epoch {best['best_epoch']}, {select_name} {best['selection_acc']:.2f}%, "
          f"test {test_acc:.2f}%, "
          f"{train_s:.0f}s")
    return out


if __name__ == "__main__":
    run_cli(main)
