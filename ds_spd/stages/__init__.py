"""The pipeline's stages: scan -> plan -> distill (with head grouping) -> recovery run."""
