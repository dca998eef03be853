"""The distillation stage: methods (MoCo v2, SEED, DisCo, Retro), losses, queue, engine."""
