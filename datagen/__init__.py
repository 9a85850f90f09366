"""Data generation: sources, the teacher, geometry and the Ray pipeline that writes WebDataset shards."""
