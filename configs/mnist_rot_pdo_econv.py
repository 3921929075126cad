"""PDO-eConv baseline: the R-fd network with every block a linear ePDO conv (g = -1).

  python train.py --config=configs/mnist_rot_pdo_econv.py

(workdir runs/mnist_rot_pdo_econv; rerun the same command to resume).

Same data, channels and protocol as R-fd (`mnist_rot_regular_fd.py`); only the five
Neural ePDO blocks are replaced by spatially shared (linear) ePDO convolutions, the layer of
PDO-eConvs. Expected: see the paper's MNIST-rot table for PDO-eConvs; not measured here.
"""

import ml_collections

from configs import mnist_rot_regular_fd


def get_config() -> ml_collections.ConfigDict:
    """Returns the linear (PDO-eConv) baseline configuration."""
    config = mnist_rot_regular_fd.get_config()
    config.model.g = -1
    config.model.s = 1
    return config
