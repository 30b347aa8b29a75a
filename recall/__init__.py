"""recall: continual semantic segmentation with replay (RECALL, ICCV 2021) as a reproducible pipeline."""

__version__ = "0.1.0"
