"""The training stage: model, losses, engine (steps, AMP, accumulation), checkpoint (the schema and `load_model`) and
the run."""
