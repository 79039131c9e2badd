"""MONAI lesion + organ segmentation: network, preprocessing, inference, training."""
