"""The errors a user fixes by changing the spec, the model or the data (CLI exit code 2).

A fresh job that fails with one of these leaves no staging behind: it cannot succeed on this input,
and the fixed input is a different job.
"""

from rayquant.jobs.spec import SpecError
from rayquant.solver.gptq import HessianNotPositiveDefinite
from rayquant.storage.calibration import CalibrationTooShort, TokenizerNotFound, UnsupportedDataset
from rayquant.storage.checkpoint import OutputConflict
from rayquant.storage.model_source import InvalidModelFiles, ModelNotFound, TensorNotFound, UnsupportedModelSource
from rayquant.storage.safetensors_reader import CorruptSafetensors, NonFiniteWeights
from rayquant.workers.adapter import UnsupportedArchitecture
from rayquant.workers.moe import StarvedExpert

INPUT_ERRORS: tuple[type[Exception], ...] = (
    SpecError, ModelNotFound, InvalidModelFiles, UnsupportedModelSource, TensorNotFound, CorruptSafetensors,
    NonFiniteWeights, UnsupportedArchitecture, OutputConflict, CalibrationTooShort, UnsupportedDataset,
    TokenizerNotFound, HessianNotPositiveDefinite,
    StarvedExpert,
)
