"""Q-gauss: C16 regular+quo_4 fields (the paper's quotient model), Gaussian stencils.

  python train.py --config=configs/mnist_rot_quotient_gauss.py

Workdir runs/mnist_rot_quotient_gauss (rerun the command to resume). The reference's
`train_mnist.py --model Q --dis gauss --g 4 --s 1 --reduction 2`; the same protocol as R-fd
(`mnist_rot_regular_fd.py`).
Expected: the accuracy of the paper's MNIST-rot table; not reproduced here. 229,374
trainable parameters.
Cost: about 28 hours on 2 CPU cores (from the benchmark's step rates); about 13 minutes on
one H200 GPU.
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
