"""Datasets, class names, transforms, and the forget/retain split builders.

Every item is `(image_tensor, target, fine_label)`: `target` is what the model is trained on,
`fine_label` the finest label the data has (the CIFAR-100 class behind a CIFAR-20 superclass).
Images stay in their compact on-disk form (uint8 arrays or files) and are transformed one item
at a time, so a 224x224 ViT run never holds the whole dataset as float tensors.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T

from common import UserError, array_sha256

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]

# The 20 CIFAR-100 superclasses, in the order of the dataset's own `coarse_label_names`.
CIFAR20_CLASSES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]

# Standard fine -> coarse map of CIFAR-100 (the `coarse_labels` field of the original files).
CIFAR100_TO_20 = np.array([
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
])

# Short superclass names used by the SSD paper's code, accepted beside the official ones.
CIFAR20_ALIASES = {
    "vehicle1": "vehicles_1", "vehicle2": "vehicles_2", "veg": "fruit_and_vegetables",
    "electrical_devices": "household_electrical_devices", "natural_scenes": "large_natural_outdoor_scenes",
    "furniture": "household_furniture", "man_made_outdoor": "large_man-made_outdoor_things",
    "carnivores": "large_carnivores", "omnivores_herbivores": "large_omnivores_and_herbivores",
    "invertebrates": "non-insect_invertebrates",
}

DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# digits5: five superclasses of two consecutive digits each, the small analogue of CIFAR-20
# that lets the sub-class scenario run offline (forget "three" while keeping "two").
DIGITS5_CLASSES = ["zero_one", "two_three", "four_five", "six_seven", "eight_nine"]
DIGITS_TO_5 = np.arange(10) // 2

# Digit pairs: two of sklearn's handwritten digits side by side, composed offline, in three sets that
# run at the forget ratios |D| / |D_f| of the paper's CIFAR tables (see pair_arrays).
PAIRS100_CLASSES = [f"{a}{b}" for a in range(10) for b in range(10)]
# pairs20: the tens digit with a low (0-4) or high (5-9) units digit, five pair classes each, as
# CIFAR-20 groups five CIFAR-100 classes: "35-39" holds 35, 36, 37, 38 and 39.
PAIRS20_CLASSES = [f"{a}{lo}-{a}{lo + 4}" for a in range(10) for lo in (0, 5)]
PAIRS100_TO_20 = np.arange(100) // 5
# pairs10: the tens (left) digit, the right digit a distractor. (The sum modulo 10, which needs
# both digits, stayed at chance after 3 epochs: too slow to learn for the CPU demo.)
PAIRS10_CLASSES = [f"{a}x" for a in range(10)]
PAIRS100_TO_10 = np.arange(100) // 10
# Pair images per class (train, test). pairs100 and pairs20 share one set of images; pairs10 has
# 1,110 training images a class so that, less the 10% validation split, forgetting 20 random samples
# gives |D| / |D_f| = 9,990 / 20 = 499.5, the paper's 50,000 / 100 = 500 on CIFAR-10.
PAIRS_PER_CLASS = {"pairs100": (40, 20), "pairs10": (1110, 200)}

# The CIFAR set each pair set mirrors, and |D| / |D_f| in the paper's tables (50,000 training images:
# a CIFAR-100 class or fine class is 500, a CIFAR-20 superclass 2,500, random forgetting 100 samples).
MIRRORS = {"pairs100": "cifar100", "pairs20": "cifar20", "pairs10": "cifar10"}
PAPER_RATIOS = {("cifar100", "full_class"): 100, ("cifar20", "full_class"): 20, ("cifar20", "sub_class"): 100,
                ("cifar10", "random"): 500}

# dataset -> (names of the training targets, names of the fine labels), for every set but faces
CLASS_NAMES = {"cifar10": (CIFAR10_CLASSES, CIFAR10_CLASSES), "cifar20": (CIFAR20_CLASSES, CIFAR100_CLASSES),
               "cifar100": (CIFAR100_CLASSES, CIFAR100_CLASSES), "digits": (DIGIT_CLASSES, DIGIT_CLASSES),
               "digits5": (DIGITS5_CLASSES, DIGIT_CLASSES), "pairs100": (PAIRS100_CLASSES, PAIRS100_CLASSES),
               "pairs20": (PAIRS20_CLASSES, PAIRS100_CLASSES), "pairs10": (PAIRS10_CLASSES, PAIRS100_CLASSES)}
DATASETS = ("cifar10", "cifar20", "cifar100", "faces", "digits", "digits5", "pairs100", "pairs20", "pairs10")
EMBEDDED = ("digits", "digits5", "pairs100", "pairs20", "pairs10")
SCENARIOS = ("full_class", "sub_class", "random")

_MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_MEAN_STD["cifar20"] = _MEAN_STD["cifar100"]
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # ViT's own processor normalisation; also digits and faces


class LabeledImages(Dataset):
    """Images from `source` (item[0] is a PIL image), with targets and fine labels as arrays."""

    def __init__(self, source, fine: np.ndarray, fine_to_target: np.ndarray | None, transform=None):
        self.source = source
        self.fine = np.asarray(fine, dtype=np.int64)
        self.targets = self.fine if fine_to_target is None else np.asarray(fine_to_target)[self.fine]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.fine)

    def __getitem__(self, i: int):
        image = self.source[i][0]
        x = self.transform(image) if self.transform is not None else image
        return x, int(self.targets[i]), int(self.fine[i])

    def with_transform(self, transform) -> "LabeledImages":
        """A view with another transform; the data itself is shared, never copied."""
        view = copy.copy(self)
        view.transform = transform
        return view


class _UInt8Images(Dataset):
    """An (N, H, W, 3) uint8 array served as PIL images, like torchvision's CIFAR."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int):
        return Image.fromarray(self.array[i]), 0


def _cifar_class(base):
    # torchvision checks md5 sums; files we generate in the same layout (tests, converted data)
    # cannot match them, so only existence is checked here. A corrupt file still fails to unpickle.
    return type(base.__name__, (base,), {
        "train_list": [[name, None] for name, _ in base.train_list],
        "test_list": [[name, None] for name, _ in base.test_list],
        "meta": {**base.meta, "md5": None},
    })


_CIFAR10 = _cifar_class(torchvision.datasets.CIFAR10)
_CIFAR100 = _cifar_class(torchvision.datasets.CIFAR100)


def _load_cifar(cls, root: Path, download: bool):
    try:
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=False)
    except Exception as e:  # download errors, missing or unreadable files
        raise UserError(f"could not load {cls.__name__} from {root}/{cls.base_folder}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''} (put the python-version CIFAR files "
                        f"there, or pass --data-dir to where they are, or allow the download)") from None


def digit_source_split(test_fraction: float = 0.25, split_seed: int = 0):
    """sklearn's 1,797 8x8 digits as uint8 (0-255) and their fixed stratified train/test split:
    (images, labels, train indices, test indices). Every embedded set draws its train and test
    images from these two disjoint pools, so no test image holds a digit seen in training."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = (d.images * (255 / 16)).round().astype(np.uint8)
    idx = np.arange(len(d.target))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=d.target, random_state=split_seed)
    return images, d.target, np.sort(train_idx), np.sort(test_idx)


def digits_arrays(image_size: int = 32, test_fraction: float = 0.25, split_seed: int = 0):
    """sklearn's 8x8 digits as RGB uint8 images of `image_size`, with a fixed stratified split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    _, _, train_idx, test_idx = digit_source_split(test_fraction, split_seed)
    return (x[train_idx], d.target[train_idx]), (x[test_idx], d.target[test_idx])


def pair_arrays(name: str, seed: int = 0):
    """The digit-pair images of `name` (pairs100, pairs20 or pairs10): 16x16 RGB uint8, the two 8x8
    digits side by side in rows 4-11. Returns ((x, fine, sources), (x, fine, sources)) for train and
    test; `sources` holds each image's two sklearn digit indices (left, right).

    pairs100 and pairs20 share their images; fine labels are the pair "ab" = 10a + b. In pairs10
    each class a (the tens digit) holds its ten pairs "a0" to "a9" in equal shares. Left and right digits are drawn
    (seeded, with replacement) from the train pool for training images and from the test pool for
    test images, so train and test never share a source digit. About 0.1 s, no download."""
    images, labels, train_pool, test_pool = digit_source_split()
    per_train, per_test = PAIRS_PER_CLASS["pairs10" if name == "pairs10" else "pairs100"]
    rng = np.random.default_rng(seed)
    by_digit = {"train": [train_pool[labels[train_pool] == d] for d in range(10)],
                "test": [test_pool[labels[test_pool] == d] for d in range(10)]}
    out = []
    for part, per_class in (("train", per_train), ("test", per_test)):
        # pairs10: per_class images of each tens digit, spread evenly over its ten pairs
        fine = np.repeat(np.arange(100), per_class // 10 if name == "pairs10" else per_class)
        sources = np.stack([np.array([rng.choice(by_digit[part][f // 10]) for f in fine]),
                            np.array([rng.choice(by_digit[part][f % 10]) for f in fine])], axis=1)
        x = np.zeros((len(fine), 16, 16, 3), dtype=np.uint8)
        x[:, 4:12, :8] = images[sources[:, 0]][..., None]
        x[:, 4:12, 8:] = images[sources[:, 1]][..., None]
        out.append((x, fine, sources))
    return tuple(out)


@dataclass
class Data:
    """One dataset: the train and test sets (eval transform) and which train indices the model trains on."""

    name: str
    train: LabeledImages
    test: LabeledImages
    train_aug: LabeledImages  # the same images, with training augmentation
    train_idx: np.ndarray     # indices of `train` used for training (all minus the validation split)
    val_idx: np.ndarray       # held-out indices of `train` for checkpoint selection
    classes: list[str]        # names of the training targets
    fine_classes: list[str]   # names of the fine labels (== classes unless superclasses are the targets)
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_superclasses(self) -> bool:
        return self.fine_classes != self.classes

    def split_hash(self) -> str:
        return array_sha256(np.concatenate([self.train_idx, [-1], self.val_idx]))


def make_transform(dataset: str, image_size: int, train: bool, vit: bool = False, native_size: int | None = None):
    """A new transform pipeline each call; nothing is shared or mutated between views."""
    mean, std = _HALF if vit else _MEAN_STD.get(dataset, _HALF)
    steps = []
    if native_size != image_size:
        steps.append(T.Resize((image_size, image_size), antialias=True))
    if train:
        steps.append(T.RandomCrop(image_size, padding=max(1, image_size // 8)))
        if dataset not in EMBEDDED:  # a mirrored digit is another symbol
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def build_data(name: str, data_dir: str | Path = "data", image_size: int | None = None, vit: bool = False,
               val_fraction: float = 0.1, split_seed: int = 0, download: bool = True,
               faces_test_fraction: float = 0.2) -> Data:
    """Load a dataset and carve a stratified validation split out of its training set.

    `image_size` defaults to the data's native size (32). The validation split depends only on
    (dataset, val_fraction, split_seed), so a checkpoint's split can be rebuilt from its metadata.
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r} (choose one of {', '.join(DATASETS)})")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    root = Path(data_dir)
    native = 32
    if name in ("cifar10", "cifar20", "cifar100"):
        cls = _CIFAR10 if name == "cifar10" else _CIFAR100
        tr, te = _load_cifar(cls, root, download)
        to_target = CIFAR100_TO_20 if name == "cifar20" else None
        classes, fine_classes = CLASS_NAMES[name]
        train = LabeledImages(tr, np.array(tr.targets), to_target)
        test = LabeledImages(te, np.array(te.targets), to_target)
    elif name in ("digits", "digits5"):
        native = image_size or 32
        (xtr, ytr), (xte, yte) = digits_arrays(native)
        to_target = DIGITS_TO_5 if name == "digits5" else None
        classes, fine_classes = CLASS_NAMES[name]
        train = LabeledImages(_UInt8Images(xtr), ytr, to_target)
        test = LabeledImages(_UInt8Images(xte), yte, to_target)
    elif name in ("pairs100", "pairs20", "pairs10"):
        native = 16
        (xtr, ftr, _), (xte, fte, _) = pair_arrays(name)
        to_target = {"pairs100": None, "pairs20": PAIRS100_TO_20, "pairs10": PAIRS100_TO_10}[name]
        classes, fine_classes = CLASS_NAMES[name]
        train = LabeledImages(_UInt8Images(xtr), ftr, to_target)
        test = LabeledImages(_UInt8Images(xte), fte, to_target)
    else:  # faces: an image folder with one sub-folder per identity, split here (the original had no split)
        folder = root / "faces"
        if not folder.is_dir():
            raise UserError(f"face dataset folder {folder} not found (put one sub-folder of images per "
                            f"identity there, e.g. PinsFaceRecognition's 105 folders, or pass --data-dir)")
        check_image_folder(folder)
        full = torchvision.datasets.ImageFolder(str(folder))
        labels = np.array(full.targets)
        idx = np.arange(len(labels))
        tr_idx, te_idx = _stratified_split(idx, faces_test_fraction, labels, split_seed, "train/test")
        tr_idx, te_idx = np.sort(tr_idx), np.sort(te_idx)
        fine_classes = classes = list(full.classes)
        train = LabeledImages(Subset(full, tr_idx), labels[tr_idx], None)
        test = LabeledImages(Subset(full, te_idx), labels[te_idx], None)
        native = None  # arbitrary sizes: always resize
    image_size = image_size or native or 32

    all_idx = np.arange(len(train))
    if val_fraction > 0:
        train_idx, val_idx = _stratified_split(all_idx, val_fraction, train.targets, split_seed, "validation")
        train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    else:
        train_idx, val_idx = all_idx, np.array([], dtype=np.int64)

    def view(ds, aug):
        return ds.with_transform(make_transform(name, image_size, aug, vit, native))

    return Data(name=name, train=view(train, False), test=view(test, False), train_aug=view(train, True),
                train_idx=train_idx, val_idx=val_idx, classes=list(classes), fine_classes=list(fine_classes),
                image_size=image_size)


def check_image_folder(folder: Path) -> None:
    """Before anything trains: one sub-folder per identity, each with at least 2 images, all readable.

    Only the headers are read (PIL's verify), so a large folder is checked in seconds."""
    identities = sorted(p for p in folder.iterdir() if p.is_dir())
    if not identities:
        raise UserError(f"face dataset folder {folder} has no identity sub-folders (put one sub-folder of "
                        f"images per identity there)")
    unreadable, few = [], []
    for identity in identities:
        images = [p for p in sorted(identity.rglob("*"))
                  if p.is_file() and torchvision.datasets.folder.has_file_allowed_extension(
                      p.name, torchvision.datasets.folder.IMG_EXTENSIONS)]
        readable = 0
        for path in images:
            try:
                with Image.open(path) as im:
                    im.verify()
                readable += 1
            except Exception:  # PIL raises many types for a damaged file
                unreadable.append(path)
        if readable < 2:
            few.append(f"{identity.name} ({readable})")
    if unreadable:
        raise UserError(f"{len(unreadable)} image(s) under {folder} cannot be read, e.g. {unreadable[0]} "
                        f"(replace or delete them)")
    if few:
        raise UserError(f"{len(few)} identity folder(s) under {folder} hold fewer than 2 images: "
                        f"{', '.join(few[:5])}{', ...' if len(few) > 5 else ''} (the stratified split needs "
                        f"at least 2 images per identity: add images or remove those folders)")


def _stratified_split(idx: np.ndarray, test_size: float, labels: np.ndarray, seed: int, what: str):
    """train_test_split stratified by `labels`, with its refusals turned into one clear error."""
    from sklearn.model_selection import train_test_split  # about 0.7 s to import: only where a split is made

    try:
        return train_test_split(idx, test_size=test_size, stratify=labels[idx], random_state=seed)
    except ValueError as e:
        counts = np.bincount(labels[idx])
        raise UserError(f"the stratified {what} split ({test_size:g} of {len(idx)} images, {np.count_nonzero(counts)} "
                        f"classes, the smallest with {counts[counts > 0].min()}) is impossible: {e} "
                        f"(add images to the small classes, or change the split fraction)") from None


def resolve_class(name: str, classes: list[str], what: str = "class") -> int:
    """A class given by name, by a known alias, or by index -> its index in `classes`."""
    key = str(name).strip()
    lowered = {c.lower(): i for i, c in enumerate(classes)}
    for candidate in (key, CIFAR20_ALIASES.get(key.lower(), ""), f"pins_{key}"):
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    if key.isdigit() and int(key) < len(classes):
        return int(key)
    shown = ", ".join(classes[:25]) + (", ..." if len(classes) > 25 else "")
    raise UserError(f"unknown {what} {name!r} (choose one of: {shown}; or an index 0-{len(classes) - 1})")


@dataclass
class Splits:
    """Index subsets for one forget request. Indices point into `data.train` and `data.test`."""

    data: Data
    scenario: str
    forget_idx: np.ndarray
    retain_idx: np.ndarray
    forget_test_idx: np.ndarray
    retain_test_idx: np.ndarray
    df_split: str  # whose accuracy is reported as Df: "forget_test" (class scenarios) or "forget_train"
    forget_classes: list[int]  # the targets that were forgotten as a whole (full class only)
    retain_val_idx: np.ndarray  # validation images outside the forget rule, for retrain's checkpoint selection
    drawn_order: np.ndarray | None = None  # random forgetting: the training indices in random_split's order

    def _sub(self, ds, idx) -> Subset:
        return Subset(ds, idx.tolist())

    @property
    def forget_train(self) -> Subset:
        return self._sub(self.data.train, self.forget_idx)

    @property
    def retain_train(self) -> Subset:
        return self._sub(self.data.train, self.retain_idx)

    @property
    def retain_train_aug(self) -> Subset:
        return self._sub(self.data.train_aug, self.retain_idx)

    @property
    def retain_val(self) -> Subset:
        return self._sub(self.data.train, self.retain_val_idx)

    @property
    def full_train(self) -> Subset:
        """D in SSD: everything the original model was trained on."""
        return self._sub(self.data.train, self.data.train_idx)

    @property
    def forget_test(self) -> Subset:
        return self._sub(self.data.test, self.forget_test_idx)

    @property
    def retain_test(self) -> Subset:
        return self._sub(self.data.test, self.retain_test_idx)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def hash(self) -> str:
        return array_sha256(np.concatenate([self.forget_idx, [-1], self.retain_idx]))


def build_splits(scenario: str, data: Data, forget_class: str | None = None, seed: int = 0,
                 forget_count: int | None = None, forget_fraction: float | None = None) -> Splits:
    """The forget/retain split of one scenario. This is the only place scenarios differ."""
    pool = data.train_idx
    test_all = np.arange(len(data.test))
    if scenario == "full_class":
        if forget_class is None:
            raise UserError("full-class forgetting needs --forget-class")
        c = resolve_class(forget_class, data.classes)
        in_train = data.train.targets[pool] == c
        in_val = data.train.targets[data.val_idx] == c
        in_test = data.test.targets == c
        forget_classes, df_split = [c], "forget_test"
    elif scenario == "sub_class":
        if forget_class is None:
            raise UserError("sub-class forgetting needs --forget-class")
        if not data.has_superclasses:
            raise UserError(f"sub-class forgetting needs a dataset whose targets are superclasses, not "
                            f"{data.name!r} (use --dataset cifar20 or --dataset digits5)")
        c = resolve_class(forget_class, data.fine_classes, "sub-class")
        in_train = data.train.fine[pool] == c
        in_val = data.train.fine[data.val_idx] == c
        in_test = data.test.fine == c
        forget_classes, df_split = [], "forget_test"
    elif scenario == "random":
        n = len(pool)
        if forget_fraction is not None:
            if not 0 < forget_fraction < 1:
                raise UserError(f"--forget-fraction must be in (0, 1), got {forget_fraction}")
            count = random_split_count(n, forget_fraction)
        else:
            count = 100 if forget_count is None else forget_count
        if not 0 < count < n:
            raise UserError(f"cannot forget {count} of {n} training samples (choose --forget-count between 1 and {n - 1})")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
        in_train = np.zeros(n, dtype=bool)
        in_train[order[:count]] = True
        in_val = np.zeros(len(data.val_idx), dtype=bool)  # validation images were never trained on
        in_test = np.zeros(len(test_all), dtype=bool)
        forget_classes, df_split = [], "forget_train"
    else:
        raise UserError(f"unknown scenario {scenario!r} (choose one of {', '.join(SCENARIOS)})")

    forget_idx, retain_idx = pool[in_train], pool[~in_train]
    if len(forget_idx) == 0:
        raise UserError(f"the forget set is empty: class {forget_class!r} has no training samples in "
                        f"{data.name} (pick a class that the data contains)")
    drawn = pool[order] if scenario == "random" else None
    return Splits(data, scenario, forget_idx, retain_idx, test_all[in_test], test_all[~in_test], df_split,
                  forget_classes, data.val_idx[~in_val], drawn)


IMPORTANCE_ORDERS = ("paper", "shuffled")


def importance_order(splits: Splits, order: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """D and D_f as indices into `data.train`, in the order SSD's importance passes read them.

    SSD squares the gradient of each batch-mean loss, so which samples share a batch is part of its
    definition, and the loaders read these orders without shuffling.

    paper: as the SSD paper's code builds them. D is the retain samples followed by the forget
      samples. In the class scenarios the retain samples come class by class (ascending target for
      full class, ascending fine class for sub-class), in dataset order within a class, so nearly
      every batch of D holds one class and the forget batches come last; D_f is in dataset order.
      In random forgetting both parts keep torch.random_split's (seeded, random) order.
      This bounds I_Df / I_D near |D| / |D_f|.
    shuffled: D shuffled with seed 0 (one order for every request, so I_D is cached per checkpoint),
      D_f shuffled with the run's seed. Mixed-class batches of D cancel in the mean gradient, so I_D
      shrinks and the ratio has no such bound.
    """
    if order == "paper":
        if splits.scenario == "random":
            forget = np.isin(splits.drawn_order, splits.forget_idx)
            forget_order, retain_order = splits.drawn_order[forget], splits.drawn_order[~forget]
        else:
            labels = splits.data.train.fine if splits.scenario == "sub_class" else splits.data.train.targets
            retain_order = splits.retain_idx[np.argsort(labels[splits.retain_idx], kind="stable")]
            forget_order = splits.forget_idx
        return np.concatenate([retain_order, forget_order]), forget_order
    if order == "shuffled":
        full = splits.data.train_idx
        return full[_randperm(len(full), 0)], splits.forget_idx[_randperm(len(splits.forget_idx), seed)]
    raise UserError(f"unknown importance order {order!r} (choose one of {', '.join(IMPORTANCE_ORDERS)})")


def _randperm(n: int, seed: int) -> np.ndarray:
    """The order in which a DataLoader with shuffle=True and a generator seeded with `seed` reads n
    items: the loader draws its workers' base seed from the generator before the permutation."""
    gen = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=gen)
    return torch.randperm(n, generator=gen).numpy()


def random_split_count(n: int, fraction: float) -> int:
    """How many samples `torch.utils.data.random_split(ds, [f, 1 - f])` puts in the first part.

    The SSD paper's code forgot `forget_perc=0.00165` of CIFAR's 50,000 images this way: floor(82.5)
    is 82, and the one sample left over by the two floors goes to the first part, giving 83, not 100.
    """
    first, _ = torch.utils.data.random_split(range(n), [fraction, 1 - fraction])
    return len(first)
