"""Settings of the shim: one dataclass, filled from flags and ``ACCELSHIM_*`` environment variables."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "ACCELSHIM_"


@dataclass
class Settings:
    """Everything the shim is configured with.

    Each field can be set by the environment variable ``ACCELSHIM_<FIELD>`` (upper case); flags win.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    unix_socket: str | None = None
    device: str = "auto"                      # auto | cpu | cuda
    models_dir: Path = Path("models")
    threads: int = 8
    classify_model: str = "efficientnet-lite0"
    max_body_bytes: int = 64 * 1024 * 1024    # 413 above
    max_image_pixels: int = 40_000_000        # per decoded image; decompression-bomb guard
    max_batch: int = 256                      # images per classify request, rows per raw-model batch
    max_gemm_elements: int = 64 * 1024 * 1024  # elements of the output C (and of A and B)
    log_level: str = "INFO"
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
        for name in ("threads", "max_body_bytes", "max_image_pixels", "max_batch", "max_gemm_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} out of range")


def _coerce(name: str, type_name: str, raw: str) -> object:
    try:
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("Path"):
            return Path(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {type_name}") from None
    return raw
