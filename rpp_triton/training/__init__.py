"""Training on top of `transformers`: pruning (`prune`), frozen-mask fine-tuning (`finetune`), the
sparsity controller, the Trainer subclass and model loading (`hub`)."""
