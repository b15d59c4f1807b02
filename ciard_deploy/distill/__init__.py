"""Distillation: the trainer loop, the methods (one module each in ``methods/``) and their losses."""
