"""microupdates: application updates for fleets of Linux edge devices, orchestrated by Temporal."""

__version__ = "0.1.0"
