"""Datasets: DreamBooth instance/class images with captions and buckets, synthetic and ImageNet-style subsets."""
