"""Full-class forgetting: make the model forget every training image of one class.

    python forget_full_class_main.py --net resnet18 --dataset cifar100 --forget-class rocket --method ssd
"""
import runner

# SSD's (alpha, lambda), as in the paper (Foster et al., AAAI 2024). Edit here; --alpha/--lambda override.
SSD_PARAMS = {
    "resnet18": (10.0, 1.0),
    "vit": (5.0, 1.0),
    # The paper's values for the PinsFaceRecognition identities; the paper's code ran it with 10 and 1.
    ("resnet18", "faces"): (50.0, 0.1),
    ("vit", "faces"): (50.0, 0.1),
    # The embedded sets take the values of the CIFAR table whose forget ratio |D| / |D_f| they mirror.
    ("resnet18", "pairs100"): (10.0, 1.0),  # as cifar100 (ratio 100)
    ("resnet18", "pairs20"): (10.0, 1.0),   # as cifar20 (ratio 20)
    ("resnet18", "digits"): (10.0, 1.0),    # ratio 10, below every paper table: alpha 10 sits at the cap
}

if __name__ == "__main__":
    runner.main("full_class", SSD_PARAMS, __doc__)
