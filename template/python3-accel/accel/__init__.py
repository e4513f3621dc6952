"""accel: call the accelshim daemon (GPU kernels and models) from a function, no GPU needed.

    import accel
    client = accel.Client()            # $ACCEL_SHIM_URL, else http://127.0.0.1:8000
    client.classify(open("cat.jpg", "rb").read())[0].label

Importing ``accel`` loads the standard library alone; numpy is imported when arrays are used.
"""
from .client import Client
from .errors import (AccelError, DeadlineExceeded, Forbidden, InsufficientStorage, InternalError, InvalidInput, NotReady,
                     OpNotFound, PayloadTooLarge, QuotaExceeded, ShimUnavailable, Unauthorized)
from .shm import SharedMemory
from .tensor import Tensor
from .types import Prediction

__version__ = "0.1.0"
__all__ = ["Client", "Tensor", "SharedMemory", "Prediction", "AccelError", "InvalidInput", "Unauthorized", "Forbidden",
           "OpNotFound", "PayloadTooLarge", "QuotaExceeded", "InternalError", "NotReady",
           "InsufficientStorage", "DeadlineExceeded", "ShimUnavailable", "__version__"]
