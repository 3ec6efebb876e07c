"""Checkpoints: our folder format, safe loading, and the official release's layout."""

from vlv_engine.checkpoint.folder import load_folder, save_folder
from vlv_engine.checkpoint.safe_load import UnsafeCheckpointError, load_state_dict_file

__all__ = ["UnsafeCheckpointError", "load_folder", "load_state_dict_file", "save_folder"]
