"""TFDS builders (built-in synthetic faces, UTKFace) and grain input pipelines."""
