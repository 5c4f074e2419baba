"""Sub-class forgetting: a superclass model (CIFAR-20, digits5) forgets one of its fine classes.

    python forget_sub_class_main.py --net resnet18 --dataset cifar20 --forget-class rocket --method ssd
"""
import runner

# SSD's (alpha, lambda), as in the paper (Foster et al., AAAI 2024). Edit here; --alpha/--lambda override.
SSD_PARAMS = {
    "resnet18": (10.0, 1.0),
    "vit": (25.0, 1.0),
}

if __name__ == "__main__":
    runner.main("sub_class", SSD_PARAMS, __doc__)
