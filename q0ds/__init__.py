"""q0ds: q0 hyper-epoch pretraining on DeepSpeed (cyclic LR/WD bases, chain distillation, learned prior)."""
__version__ = "0.1.0"
