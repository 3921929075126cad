"""D-gauss: D16 regular fields in blocks 1-5, restricted to C16 before block 6 (D16|5C16).

  python train.py --config=configs/mnist_rot_dihedral_gauss.py

Workdir runs/mnist_rot_dihedral_gauss (rerun the command to resume). The reference's
`train_mnist.py --model R --dis gauss --flip True --g 4 --s 1 --reduction 1`; the same
protocol as R-fd (`mnist_rot_regular_fd.py`).
Expected: the accuracy of the paper's MNIST-rot table; not reproduced here. 525,190
trainable parameters.
Cost: about 38 hours on 2 CPU cores (from the benchmark's step rates); about 20 minutes on
one H200 GPU.
"""

import ml_collections

from configs import mnist_rot_regular_fd


def get_config() -> ml_collections.ConfigDict:
    """Returns the D-gauss configuration."""
    config = mnist_rot_regular_fd.get_config()
    config.model.flip = True
    config.model.channels = (12, 16, 24, 24, 32, 64)
    config.model.g = 4
    config.model.s = 1
    config.model.reduction = 1
    config.model.discretisation = "gauss"
    return config
