"""R-fd: C16 regular Neural ePDOs, fd stencils, MNIST-rot with the paper's full protocol.

  python train.py --config=configs/mnist_rot_regular_fd.py

(workdir runs/mnist_rot_regular_fd; rerun the same command to resume).

Protocol (SPEC 6-7, the reference's `train_mnist.py --model R --dis fd --g 4 --s 4
--reduction 1`): all 12,000 MNIST-rot training images, batch 64, 199 epochs, Adam 2e-3
(betas 0.9/0.999, eps 1e-8) with coupled L2 1e-4, LR x0.1 at epoch 60 and x0.5 at 120, 150,
180, 'reference' rotation augmentation, seed 0; test accuracy on the 50,000 test images every
epoch from epoch 60; the best of those is selected on the test set, as the reference does.
Needs the MNIST-rot files (`mnist_rotation_new.zip`), see `neural_epdo_jax/datasets.py`.

Expected: see the paper's MNIST-rot table (about 99.1-99.2% for the regular models); not
measured here (199 epochs are far beyond a CPU budget). 234,186 trainable parameters.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the R-fd configuration."""
    config = default.get_config()

    # Data: MNIST-rot, all 12,000 training images, 50,000 test images.
    config.dataset = "mnist_rot"
    config.train_split = "train"
    config.test_split = "test"
    config.augmentation = "reference"

    # Model (SPEC 6, row R-fd).
    config.model.n = 16
    config.model.flip = False
    config.model.field_type = "regular"
    config.model.channels = (16, 24, 32, 32, 48, 64)
    config.model.order = 4
    config.model.g = 4
    config.model.s = 4
    config.model.reduction = 1
    config.model.discretisation = "fd"
    config.model.dropout = 0.1

    # Optimisation (SPEC 7).
    config.seed = 0
    config.batch_size = 64
    config.num_epochs = 199
    config.learning_rate = 2e-3
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    config.weight_decay = 1e-4
    config.lr_boundaries_epochs = (60, 120, 150, 180)
    config.lr_scales = (0.1, 0.5, 0.5, 0.5)
    config.reset_adam_every_epoch = False

    # Evaluation: every epoch from epoch 60, as the reference.
    config.eval_batch_size = 250
    config.eval_every_epochs = 1
    config.eval_from_epoch = 60
    config.log_every_steps = 50
    return config
