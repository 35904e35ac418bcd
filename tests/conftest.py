"""The tests' models are tiny: on one thread they run several times faster than on two, whose
hand-offs cost more than the work. Scripts the tests start inherit it through OMP_NUM_THREADS."""
import os

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)
