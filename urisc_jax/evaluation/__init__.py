"""Evaluation: the official U-RISC F1 scorer, ISBI 2012 V_rand / V_info, image definition criteria and reports.

`official_f1` and the file utilities load with the package; `isbi`, `criteria` and `report` are submodules
(`from urisc_jax.evaluation import report`) so that importing the scorer stays light.
"""

from urisc_jax.evaluation.f1 import ImageReadError
from urisc_jax.evaluation.f1 import PairingError
from urisc_jax.evaluation.f1 import SubmissionFormatError
from urisc_jax.evaluation.f1 import check_prediction_format
from urisc_jax.evaluation.f1 import mean_and_sem
from urisc_jax.evaluation.f1 import official_f1
from urisc_jax.evaluation.f1 import pixel_error
from urisc_jax.evaluation.f1 import read_gray8
from urisc_jax.evaluation.f1 import score_folders

__all__ = [
    "ImageReadError",
    "PairingError",
    "SubmissionFormatError",
    "check_prediction_format",
    "mean_and_sem",
    "official_f1",
    "pixel_error",
    "read_gray8",
    "score_folders",
]
