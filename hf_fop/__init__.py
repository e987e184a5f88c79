"""hf-fop: Fisher-Orthogonal Projection (K-FAC natural gradient plus a Fisher-orthogonal
correction) for PyTorch and the Hugging Face stack."""

from hf_fop.config import FOPConfig
from hf_fop.optimizer import FOP
from hf_fop.partition import Partition, UnsupportedWrapperError, partition_model

__all__ = ["FOP", "FOPConfig", "Partition", "UnsupportedWrapperError", "partition_model"]
__version__ = "0.1.0"
