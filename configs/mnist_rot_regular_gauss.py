"""R-gauss: as R-fd (`mnist_rot_regular_fd.py`) with Gaussian-derivative stencils.

  python train.py --config=configs/mnist_rot_regular_gauss.py

Workdir runs/mnist_rot_regular_gauss (rerun the command to resume). The reference's
`train_mnist.py --model R --dis gauss --g 4 --s 4 --reduction 1`; the same protocol as R-fd.
Expected: the paper reports about 99.1-99.2% test accuracy for the regular models; not
reproduced here. 234,186 trainable parameters.
Cost: about 18 hours on 2 CPU cores (from the benchmark's step rates); about 12 minutes on
one H200 GPU.
"""

import ml_collections

from configs import mnist_rot_regular_fd


def get_config() -> ml_collections.ConfigDict:
    """Returns the R-gauss configuration."""
    config = mnist_rot_regular_fd.get_config()
    config.model.discretisation = "gauss"
    return config
