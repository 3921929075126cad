"""The runnable examples, run small: examples/custom_c8.py."""

import importlib.util
import os
import sys

import numpy as np
from absl.testing import absltest

from neural_epdo_jax import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name):
    module_spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO, "examples", f"{name}.py")
    )
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses (Flax modules) look their module up there
    module_spec.loader.exec_module(module)
    return module


class CustomC8Test(absltest.TestCase):
    def test_main_builds_checks_and_trains(self):
        example = load_example("custom_c8")
        kwargs = dict(num_fields=2, kernel_size=3, order=2)  # small: fast to compile
        result = example.main(steps=12, batch_size=16, num_examples=64, data="digits", **kwargs)
        self.assertLess(max(result["equivariance_errors"].values()), 1e-4)
        self.assertLess(max(result["invariance_errors"].values()), 1e-4)
        self.assertLess(result["final_loss"], result["initial_loss"])
        self.assertTrue(np.all(np.isfinite(result["losses"])))
        # The logits checked are not trivially invariant (the zero-initialised head moved).
        head = result["variables"]["params"]["Dense_0"]["kernel"]
        self.assertGreater(float(np.max(np.abs(head))), 0.0)
        # Negative control: rotating space but not the fibres of the feature map fails.
        t_in, t_hid = example.C8Net(**kwargs).types()
        features = lambda x: result["evaluate"](result["variables"], x)[0]
        x, _ = example.load_data("digits", 16)  # the batch size main compiled for
        bad = testing.equivariance_errors(features, x, t_in, t_hid, fibres=False)
        self.assertGreater(max(bad.values()), 1e-2)

    def test_random_data_and_bad_choice(self):
        example = load_example("custom_c8")
        images, labels = example.load_data("random", 5)
        self.assertEqual(images.shape, (5, 28, 28, 1))
        self.assertEqual(labels.shape, (5,))
        with self.assertRaisesRegex(ValueError, "'digits' or 'random'"):
            example.load_data("mnist", 5)


if __name__ == "__main__":
    absltest.main()
