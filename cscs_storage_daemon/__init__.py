"""cscs-storage-daemon: keeps CSCS storage JSON in step with Waldur orders."""

__version__ = "0.1.0"
APP_VERSION = "1.4.0"  # the envelope version consumers check; never the daemon's own version
