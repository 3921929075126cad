"""Q-gauss: C16 regular+quo_4 fields (the paper's quotient model), Gaussian stencils.

  python train.py --config=configs/mnist_rot_quotient_gauss.py

(workdir runs/mnist_rot_quotient_gauss; rerun the same command to resume).

The reference's `train_mnist.py --model Q --dis gauss --g 4 --s 1 --reduction 2`; same
protocol as R-fd (SPEC 6-7). Expected: see the paper's MNIST-rot table; not measured here.
229,374 trainable parameters.
"""

import ml_collections

from configs import mnist_rot_regular_fd


def get_config() -> ml_collections.ConfigDict:
    """Returns the Q-gauss configuration."""
    config = mnist_rot_regular_fd.get_config()
    config.model.field_type = "regular+quo_4"
    config.model.channels = (12, 16, 24, 24, 32, 64)
    config.model.g = 4
    config.model.s = 1
    config.model.reduction = 2
    config.model.discretisation = "gauss"
    return config
