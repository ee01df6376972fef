"""The errors a user fixes by changing the spec, the model or the data (CLI exit code 2).

A fresh job that fails with one of these leaves no staging behind: it cannot succeed on this input,
and the fixed input is a different job.
"""

from rayquant.jobs.cluster import ClusterTooSmall
from rayquant.jobs.job_client import ClusterAuthFailed, ClusterUnreachable, NoClusterAddress
from rayquant.jobs.spec import SpecError
from rayquant.jobs.submission import JobNotFound
from rayquant.solver.gptq import HessianNotPositiveDefinite
from rayquant.storage.calibration import (
    CalibrationTooShort, RecordsShorterThanSeqLen, TokenizerMismatch, TokenizerNotFound, UnsupportedDataset,
)
from rayquant.storage.gptq_checkpoint import InvalidGPTQCheckpoint, UnsupportedCheckpointFormat
from rayquant.storage.model_source import InvalidModelFiles, ModelNotFound, TensorNotFound, UnsupportedModelSource
from rayquant.storage.hub_files import HubAccessDenied, HubRepoNotFound, HubRevisionNotFound, HubUnreachable
from rayquant.storage.hub_sink import HubOutputConflict
from rayquant.storage.output_claims import MalformedClaim, OutputLocked, OutputNotWritable
from rayquant.storage.s3_files import S3AccessDenied, S3ObjectNotFound, S3Unreachable
from rayquant.storage.s3_sink import S3OutputConflict
from rayquant.storage.safetensors_reader import CorruptSafetensors, NonFiniteWeights
from rayquant.storage.staging import NotEnoughDisk, OutputConflict, OutputDamaged
from rayquant.storage.text_sources import DatasetNotCached, DatasetNotFound, EmptyDataset, UnreadableDataset
from rayquant.workers.adapter import UnsupportedArchitecture
from rayquant.workers.layer_overrides import OverrideMatchesNothing, OverridesSplitFusedLayer
from rayquant.workers.moe import StarvedExpert

INPUT_ERRORS: tuple[type[Exception], ...] = (
    SpecError, ModelNotFound, InvalidModelFiles, UnsupportedModelSource, TensorNotFound, CorruptSafetensors,
    NonFiniteWeights, UnsupportedArchitecture, OutputConflict, CalibrationTooShort, UnsupportedDataset,
    TokenizerNotFound, HessianNotPositiveDefinite, UnsupportedCheckpointFormat, InvalidGPTQCheckpoint,
    StarvedExpert, OverrideMatchesNothing, OverridesSplitFusedLayer,
    DatasetNotFound, DatasetNotCached, UnreadableDataset, EmptyDataset, RecordsShorterThanSeqLen, TokenizerMismatch,
    S3ObjectNotFound, S3AccessDenied, S3Unreachable, S3OutputConflict,
    HubRepoNotFound, HubRevisionNotFound, HubAccessDenied, HubUnreachable, HubOutputConflict,
    OutputDamaged, OutputLocked, MalformedClaim, NotEnoughDisk, OutputNotWritable,
    NoClusterAddress, ClusterUnreachable, ClusterAuthFailed, JobNotFound, ClusterTooSmall,
)
