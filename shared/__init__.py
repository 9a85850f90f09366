"""Code that both `datagen` and `trainer` import: the shard format, depth codecs, the camera type.

Nothing here imports ray, open3d, transformers or torch.
"""
