"""Data: the sources (cifar10, folder, synthetic), the one image decoder, the decoded-data cache, the splits,
batches on the device and augmentation (albumentations and its on-device twin). Imports config and the leaves."""
