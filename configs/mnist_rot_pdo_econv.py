"""PDO-eConv baseline: the R-fd network with every block a linear ePDO conv (g = -1).

  python train.py --config=configs/mnist_rot_pdo_econv.py

Workdir runs/mnist_rot_pdo_econv (rerun the command to resume). The data, channels and
protocol of R-fd (`mnist_rot_regular_fd.py`); the five Neural ePDO blocks are replaced by
spatially shared (linear) ePDO convolutions, the PDO-eConv layer.
Expected: the PDO-eConv accuracy of the paper's MNIST-rot table; not reproduced here.
1,633,770 trainable parameters.
Cost: not measured.
"""

import ml_collections

from configs import mnist_rot_regular_fd


def get_config() -> ml_collections.ConfigDict:
    """Returns the linear (PDO-eConv) baseline configuration."""
    config = mnist_rot_regular_fd.get_config()
    config.model.g = -1
    config.model.s = 1
    return config
