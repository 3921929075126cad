"""Data: the datasets' sources (`sources`: bundled digits, IDX files, MNIST-rot, TFDS), the
batching pipeline (`pipeline`) and the on-device augmentation (`augment`)."""
