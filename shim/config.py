"""Settings of the shim: one dataclass, filled from flags and ``ACCELSHIM_*`` environment variables."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "ACCELSHIM_"
DRAIN_SECONDS = 30.0       # after SIGTERM, requests in flight are finished for up to this long
TASKS_SHUTDOWN_S = 5.0     # then the request threads still running are waited for this long


@dataclass
class Settings:
    """Everything the shim is configured with.

    Each field can be set by the environment variable ``ACCELSHIM_<FIELD>`` (upper case); flags win.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    unix_socket: str | None = None
    vsock_port: int | None = None             # AF_VSOCK port on VMADDR_CID_ANY (microVM guests)
    device: str = "auto"                      # auto | cpu | cuda
    gpu_memory_limit: int = 0                 # bytes of GPU memory for requests' operands (0: no limit)
    batching: bool = True                     # dynamic batching of classify and raw models
    cuda_graphs: bool = True                  # models on the GPU replay a captured CUDA graph per batch size
    gpu_jpeg: bool = False                    # classify's plain JPEGs decoded on the GPU's JPEG engines
    models_dir: Path = Path("models")
    threads: int = 32                         # requests served at once (more: bigger dynamic batches)
    workers: int = 1                          # request worker processes in front of the device process (1: none)
    classify_model: str = "efficientnet-lite0"
    max_body_bytes: int = 256 * 1024 * 1024   # 413 above (two 4096x4096 FP32 operands fit)
    max_image_pixels: int = 40_000_000        # per decoded image; decompression-bomb guard
    max_batch: int = 256                      # images per classify request, rows per raw-model batch
    max_gemm_elements: int = 64 * 1024 * 1024  # elements of the output C (and of A and B)
    log_level: str = "INFO"
    gil_switch_us: int = 0                    # the interpreter's thread switch interval (0: Python's 5000)
    connection_threads: bool = True           # each connection read and served on a thread of its own
    tokens_file: Path | None = None           # tenant -> token; needed on a non-loopback TCP address
    max_queue: int = 64                       # requests waiting for one of the `threads` slots (429 above)
    tenant_max_inflight: int = 0              # each tenant's share of the slots (0: all of them)
    tenant_max_queue: int = 0                 # each tenant's share of the queue (0: all of it)
    tenant_max_body_bytes: int = 0            # each tenant's request body limit (0: max_body_bytes)
    tenant_max_buffer_bytes: int = 0          # each tenant's buffer store bytes (0: the store's bound)
    kernels_dir: Path | None = None           # more KaaS kernel libraries (folders of kernels.cu + reference.py)
    buffer_store_bytes: int = 1 << 30         # KaaS buffer store bound (507 above)
    gpu_cache_bytes: int = 1 << 30            # KaaS GPU-resident buffer cache bound
    state_dir: Path | None = None             # persist the KaaS buffer store here (None: in memory)
    shared_memory: bool = True                # serve the system_shared_memory extension (docs/shared-memory.md)
    shm_dir: Path = Path("/dev/shm")          # where shared memory keys resolve
    shm_tenant_dirs: bool = False             # a tenant's keys resolve in shm_dir/<tenant>/ instead
    shm_max_regions: int = 64                 # shared memory regions per tenant (429 above)
    shm_max_bytes: int = 1 << 32              # mapped shared memory bytes per tenant (507 above)
    shm_prefault_threads: int = 4             # threads filling a new region's page tables before its first use (0: off)
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> "Settings":
        """Defaults, then ``ACCELSHIM_*`` variables, then non-None ``overrides``."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _coerce(f.name, str(f.type), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "models_dir" in values:
            values["models_dir"] = Path(values["models_dir"])  # type: ignore[arg-type]
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        for name in ("threads", "workers", "max_body_bytes", "max_image_pixels", "max_batch", "max_gemm_elements",
                     "buffer_store_bytes", "gpu_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.tokens_file is None and self.host.lower() != "none" and not is_loopback(self.host):
            raise ValueError(f"--host {self.host} is reachable from other machines: give --tokens FILE "
                             "(tenant: token lines) so that callers must authenticate")
        for name in ("max_queue", "tenant_max_inflight", "tenant_max_queue", "tenant_max_body_bytes",
                     "tenant_max_buffer_bytes", "shm_max_regions", "shm_max_bytes", "shm_prefault_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        if self.vsock_port is not None and not 0 < self.vsock_port < 0xFFFFFFFF:
            raise ValueError(f"vsock port {self.vsock_port} out of range (1 to 4294967294)")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``): reachable from this machine alone."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str) -> int:
    """``"1048576"``, ``"64MiB"``, ``"8G"``, ``"512k"`` -> bytes (K/M/G/T: powers of 1000, Ki/Mi/Gi/Ti of 1024).

    Raises:
        ValueError: not a whole number of bytes with a known unit.
    """
    raw = text.strip()
    number = raw.rstrip("BbIiKkMmGgTt ")
    unit = raw[len(number):].strip().lower().removesuffix("b")
    if unit not in _UNITS or not number.strip().isdigit():
        raise ValueError(f"{text!r} is not a size: use bytes, or a number with K, M, G, Ki, Mi, Gi (e.g. 8GiB)")
    return int(number) * _UNITS[unit]


def _coerce(name: str, type_name: str, raw: str) -> object:
    try:
        if type_name.startswith("int"):
            return parse_bytes(raw)
        if type_name == "bool":
            if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if type_name.startswith("Path"):
            return Path(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {type_name}") from None
    return raw
