"""Training code for VLV (installed as `vlv_training`): stage 1, stage 2, the nano recipe.

The model is `vlv_engine.models.VLVModel`; nothing here defines a second one.
"""
