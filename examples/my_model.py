"""An outside model, as a user has it: a plain PyTorch CNN for the 8x8 grayscale digits, written without robal,
with a factory that loads its weights. `robal eval --model examples.my_model:load --data ...` audits it."""
import torch
from torch import nn


class DigitsCNN(nn.Module):
    """[0, 1] N x 1 x 8 x 8 images -> 10 logits; normalisation inside, as robal's attacks work on pixels."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.body((x - 0.5) / 0.5))


def load(weights: str = "examples/digits_cnn.pt") -> nn.Module:
    model = DigitsCNN()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()
