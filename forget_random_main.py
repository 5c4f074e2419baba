"""Random forgetting: forget a seeded random subset of the training set (100 samples by default).

    python forget_random_main.py --net resnet18 --dataset cifar10 --forget-count 100 --method ssd
"""
import runner

# SSD's (alpha, lambda), as in the paper (Foster et al., AAAI 2024). Edit here; --alpha/--lambda override.
SSD_PARAMS = {
    "resnet18": (10.0, 1.0),
    "vit": (10.0, 1.0),
    # The embedded sets take the values of the CIFAR table whose forget ratio |D| / |D_f| they mirror.
    ("resnet18", "pairs10"): (10.0, 1.0),   # as cifar10 random, 100 of 50,000 (ratio 500; here 20 of 9,990)
    ("resnet18", "digits"): (10.0, 1.0),    # 100 of 1,212 (ratio 12)
}

if __name__ == "__main__":
    runner.main("random", SSD_PARAMS, __doc__)
