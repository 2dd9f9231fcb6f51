"""End-to-end pipelines that chain the stages: the demo."""
