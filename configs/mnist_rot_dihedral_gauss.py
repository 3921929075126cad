"""D-gauss: D16 regular fields in blocks 1-5, restricted to C16 before block 6 (D16|5C16).

  python train.py --config=configs/mnist_rot_dihedral_gauss.py

(workdir runs/mnist_rot_dihedral_gauss; rerun the same command to resume).

The reference's `train_mnist.py --model R --dis gauss --flip True --g 4 --s 1 --reduction 1`;
same protocol as R-fd (SPEC 6-7). Expected: see the paper's MNIST-rot table; not measured
here. 525,190 trainable parameters.
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
