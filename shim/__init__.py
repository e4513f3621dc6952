"""accelshim: the host daemon that owns the GPU and serves semantic acceleration calls."""

__version__ = "0.1.0"
