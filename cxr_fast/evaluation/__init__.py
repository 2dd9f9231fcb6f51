"""The evaluation stage: Grad-CAM++, the analysis of a split and its report."""
