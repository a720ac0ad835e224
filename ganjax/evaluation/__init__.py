"""Evaluation: cheap in-loop metrics (aging_in_loop, translation_in_loop, scene_labels) and `--mode eval`
(offline: the driver; aging_offline with age_accuracy and identity; translation_offline with fid and
segmentation)."""
