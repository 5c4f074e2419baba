"""Sub-class forgetting: a superclass model (CIFAR-20, digits5) forgets one of its fine classes.

    python forget_sub_class_main.py --net resnet18 --dataset cifar20 --forget-class rocket --method ssd
"""
import runner

# SSD's (alpha, lambda), as in the paper (Foster et al., AAAI 2024). Edit here; --alpha/--lambda override.
SSD_PARAMS = {
    "resnet18": (10.0, 1.0),
    "vit": (25.0, 1.0),
    # The embedded sets take the values of the CIFAR table whose forget ratio |D| / |D_f| they mirror.
    ("resnet18", "pairs20"): (10.0, 1.0),   # as cifar20 sub-class (ratio 100)
    ("resnet18", "digits5"): (10.0, 1.0),   # ratio 10, below every paper table: alpha 10 sits at the cap
}

if __name__ == "__main__":
    runner.main("sub_class", SSD_PARAMS, __doc__)
