"""Tiny configuration for the tests' end-to-end runs (not a benchmark).

  python train.py --config=configs/test.py --workdir=/tmp/neural_epdo_test

C4 regular fields, two fields per block, order-2 3x3 stencils, 80 training and 50 test
digits (the last training and test batches are padded), 2 epochs.
Expected: it runs end to end; the accuracy means nothing.
Cost: about a minute on 2 CPU cores, compile included.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the tiny test configuration."""
    config = default.get_config()

    # Data: small subsets of the bundled digits.
    config.num_train_examples = 80
    config.num_test_examples = 50

    # Model: C4, two regular fields per block, derivatives up to order 2 on 3x3 stencils
    # (a third of the 5x5 taps: the train step compiles and runs much faster).
    config.model.n = 4
    config.model.channels = (2, 2, 2, 2, 2, 2)
    config.model.order = 2
    config.model.kernel_size = 3
    config.model.g = 2
    config.model.s = 1
    config.model.reduction = 1

    # Data path of the paper's protocol (the default config skips the augmentation).
    config.augmentation = "reference"

    # Optimisation: 3 steps per epoch (the third padded), LR drop before epoch 2.
    config.batch_size = 32
    config.learning_rate = 2e-3
    config.num_epochs = 2
    config.lr_boundaries_epochs = (2,)
    config.lr_scales = (0.1,)

    config.eval_batch_size = 20
    config.log_every_steps = 1
    config.progress_bar = False
    return config
