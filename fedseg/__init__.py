"""fedseg: federated medical image segmentation across hospitals (command-line front door)."""

__version__ = "0.1.0"
