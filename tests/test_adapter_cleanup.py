"""Loading a fine-tuned adapter from an object store leaves no temporary folder behind.

diffusers reads a LoRA adapter from a local folder, so the weights of a remote version are copied to a temporary one
first. It must be gone once the synthesis engine has loaded them, and when loading fails too: it used to outlive
every run (``realfake-adapter-*``, about 15 after a day of runs). The store here is fsspec's in-memory filesystem,
which the library treats as remote like S3; ``tempfile.tempdir`` points at a fresh folder that must stay empty.
"""

from __future__ import annotations

import os
import tempfile
import uuid

import pytest
import torch
from conftest import mini_config

from realfake.data.storage import Store
from realfake.finetune import WEIGHTS_NAME, _save_adapter, adapter_dir, adapter_hash, add_lora
from realfake.models.loading import load_sd_components
from realfake.synthesize import SynthesisEngine


@pytest.fixture(scope="module")
def adapter_bytes(tiny_base, tmp_path_factory) -> bytes:
    """An adapter file as fine-tuning saves it, with non-zero LoRA weights (so loading it changes the UNet)."""
    unet = load_sd_components(tiny_base)["unet"]
    add_lora(unet, rank=4)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("adapter")
    _save_adapter(unet, folder)
    return (folder / WEIGHTS_NAME).read_bytes()


@pytest.mark.parametrize("damaged", [False, True], ids=["loads", "fails-to-load"])
def test_an_adapter_from_an_object_store_leaves_no_temporary_folder(tiny_base, adapter_bytes, tmp_path, monkeypatch,
                                                                      damaged):
    store = Store(f"memory://realfake-test-{uuid.uuid4().hex}/mini/v1")
    assert not store.local
    store.write_bytes(adapter_bytes[: len(adapter_bytes) // 2] if damaged else adapter_bytes,
                      *adapter_dir("all"), WEIGHTS_NAME)
    cfg = mini_config(str(tmp_path / "root"), tiny_base, str(tmp_path / "unused"), guidance__enabled=False)
    assert cfg.finetune.enabled and cfg.finetune.scope == "all"
    components = load_sd_components(tiny_base)
    base_q = next(p for n, p in components["unet"].named_parameters() if n.endswith("attn1.to_q.weight")).clone()
    fresh = tmp_path / "tmp"
    fresh.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(fresh))
    if damaged:
        with pytest.raises(Exception):  # noqa: B017 - whatever safetensors or diffusers raise for a torn file
            SynthesisEngine(cfg, store, components=components)
    else:
        engine = SynthesisEngine(cfg, store, components=components)
        assert engine.adapters == {"all": adapter_hash(store, "all")}
        fused_q = next(p for n, p in engine.pipe.unet.named_parameters() if n.endswith("attn1.to_q.weight"))
        assert not torch.equal(fused_q, base_q)  # the adapter was loaded and fused
    assert os.listdir(fresh) == []
