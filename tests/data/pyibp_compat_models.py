"""A small model factory for the run folders kept as test data (tests/data/run_*): a few hundred KB
with its optimiser state, where the tutorial CNN's checkpoint would take megabytes."""
from torch import nn


def tiny_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """Conv 4 stride 2 - Conv 8 stride 2 (3x3, padding 1), Linear 32, Linear ``num_classes``."""
    side = (image_size + 3) // 4
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * side * side, 32), nn.ReLU(), nn.Linear(32, num_classes))
