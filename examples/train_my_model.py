"""Your own training loop with robal's pieces: long-tailed digits, PGD-5 adversarial training (robal.attacks.pgd)
and a long-tailed loss by name (robal.losses.build). Writes examples/digits_cnn.pt for examples/my_model.py.

    python examples/train_my_model.py [EPOCHS]
"""
import sys

import torch

import robal.attacks
import robal.losses
from robal.data import load_source, long_tailed_counts, subsample_indices
from my_model import DigitsCNN

epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 40
torch.manual_seed(0)
digits = load_source("digits")                                   # 8x8 grayscale, 50 test images per class
counts = long_tailed_counts(120, 10, 10)                         # 120 down to 12 training images per class
keep = subsample_indices(digits.y_train, counts, seed=0)
x = torch.from_numpy(digits.x_train[keep]).permute(0, 3, 1, 2).float() / 255
y = torch.from_numpy(digits.y_train[keep])

model = DigitsCNN()
loss_fn = robal.losses.build("logit_adjust", counts, tau=1.0)   # balanced softmax: CE(z + log pi)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
for epoch in range(epochs):
    for batch in torch.randperm(len(y)).split(64):
        model.eval()                                             # attack with BatchNorm's running statistics
        x_adv = robal.attacks.pgd(model, x[batch], y[batch], eps=0.1, step_size=0.025, steps=5)
        model.train()
        loss = loss_fn(model(x_adv), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
torch.save(model.state_dict(), "examples/digits_cnn.pt")
print(f"trained {epochs} epochs on {len(y)} long-tailed digits; wrote examples/digits_cnn.pt")
