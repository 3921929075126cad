"""R-gauss: as R-fd (`mnist_rot_regular_fd.py`) with Gaussian-derivative stencils.

  python train.py --config=configs/mnist_rot_regular_gauss.py

(workdir runs/mnist_rot_regular_gauss; rerun the same command to resume).

The reference's `train_mnist.py --model R --dis gauss --g 4 --s 4 --reduction 1`; same
protocol as R-fd (SPEC 6-7). Expected: see the paper's MNIST-rot table (about 99.1-99.2% for
the regular models); not measured here. 234,186 trainable parameters.
"""

import ml_collections

from configs import mnist_rot_regular_fd


def get_config() -> ml_collections.ConfigDict:
    """Returns the R-gauss configuration."""
    config = mnist_rot_regular_fd.get_config()
    config.model.discretisation = "gauss"
    return config
