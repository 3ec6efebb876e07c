import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from vlv_engine.checkpoint.safe_load import UnsafeCheckpointError, load_state_dict_file


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": _Payload(marker)}, f)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_torch_save_zip_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.bin"
    torch.save({"w": torch.ones(2), "evil": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict_file(path)
    assert not marker.exists()


def test_plain_state_dicts_load(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save(sd, tmp_path / "x.pt")
    torch.save({"model_state_dict": sd}, tmp_path / "y.pt")
    save_file(sd, str(tmp_path / "z.safetensors"))
    for name in ("x.pt", "y.pt", "z.safetensors"):
        out = load_state_dict_file(tmp_path / name)
        assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


def test_non_state_dict_is_rejected(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="flat state dict"):
        load_state_dict_file(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(tmp_path / "missing.pt")
