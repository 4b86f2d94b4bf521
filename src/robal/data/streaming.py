"""The streaming loader (`data.loader: streaming`): training images decoded batch by batch in worker processes,
for data that does not fit on the device.

It yields exactly the batches of the in-memory `DeviceLoader` with the same seed: the epoch's order comes from
the same sampler and the same CPU generator, drawn in the main process; workers only turn a batch's indices
into its uint8 images (decoding files, or reading the decoded cache `data.cache`); augmentation, crop and flip
then run on the device batch in the main process, from the same generator in the same order. The generator's
state, saved in every checkpoint, is therefore all a resumed run needs to continue bit for bit.

Each epoch is one pass of a torch DataLoader over the epoch's list of index batches (`batch_size=None`): with
`data.workers` N > 0, N persistent processes decode ahead of training (`prefetch` batches each), in order;
with 0 the main process decodes each batch when it is needed. Under torchrun every rank decodes the whole
global batch and keeps its slice after augmentation (as the in-memory loader does).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .folder import ImageFiles
from .loader import DeviceLoader


class BatchSource(Dataset):
    """dataset[indices] -> the uint8 (B, H, W, C) images at those indices: decoded files, rows of the memory-mapped
    decoded cache (opened in each worker), or rows of an in-memory array."""

    def __init__(self, images):
        self.images = images
        self.cache_file = None
        if isinstance(images, ImageFiles) and images.cache is not None:
            images.cached()  # decode once into data.cache (or check the file there), before any worker starts
            self.cache_file = images.cache_path()
        self._rows = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices) -> np.ndarray:
        indices = np.asarray(indices)
        if self.cache_file is not None:
            if self._rows is None:  # opened lazily: in the worker process, not pickled into it
                self._rows = np.load(self.cache_file, mmap_mode="r")
            return np.ascontiguousarray(self._rows[indices])
        if isinstance(self.images, ImageFiles):
            return self.images.rows(indices)
        return np.ascontiguousarray(self.images[indices])


class EpochBatches(Sampler):
    """The index batches of the current epoch, set by the loader before each pass."""

    def __init__(self):
        self.batches: list[np.ndarray] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class DecodedRows:
    """`loader.x[a:b]`: those training images as a uint8 NCHW tensor on the device (the trainer's logit-scale
    probe reads the first 256), decoded on demand."""

    def __init__(self, source: BatchSource, device):
        self.source, self.device = source, device

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index) -> torch.Tensor:
        indices = np.arange(len(self.source))[index]
        return torch.from_numpy(self.source[np.atleast_1d(indices)]).permute(0, 3, 1, 2).contiguous().to(self.device)


class StreamingLoader(DeviceLoader):
    """DeviceLoader's batches with the images decoded by `workers` processes instead of held on the device."""

    def __init__(self, x, y, batch_size: int, device="cpu", *args, workers: int = 0, prefetch: int = 4, **kwargs):
        self.workers, self.prefetch = workers, prefetch
        super().__init__(x, y, batch_size, device, *args, **kwargs)
        self.batches = EpochBatches()
        pin = torch.device(device).type == "cuda"
        self.pipeline = DataLoader(self.source, batch_size=None, sampler=self.batches, num_workers=workers,
                                   pin_memory=pin, prefetch_factor=prefetch if workers else None,
                                   persistent_workers=workers > 0,
                                   generator=torch.Generator())  # its seed draws leave the global RNG alone
        self.device = torch.device(device)

    def hold(self, x, device):
        self.source = BatchSource(x)
        return DecodedRows(self.source, device)

    def __iter__(self):
        order = self.epoch_order()
        self.batches.batches = [order[s:s + self.batch_size].numpy() for s in range(0, len(order), self.batch_size)]
        for idx, images in zip(self.batches.batches, self.pipeline):
            x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
            yield self.finish_batch(x, torch.from_numpy(idx))
