"""`--device-map`: the entropy lens, the ablation matrix and Taylor on a model spread over devices by layer equal a
single-device run, bitwise. A CPU-only machine has one device, so the split map streams layers (and the final norm
and unembedding) from disk: accelerate dispatches the model as it does across GPUs (a hook per module that moves
inputs to its execution device), and the offloaded weights sit on "meta" until their hook loads them, so any code
that took a device (or a weight) from the wrong module, or lost accelerate's forward wrappers, fails here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from btp.arch import adapter, module_device
from btp.store import read_npz

pytestmark = pytest.mark.usefixtures("one_thread")

# layers 0 and 2 resident, layer 1, the final norm and the unembedding streamed from disk per pass
SPLIT = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.norm": "disk",
    "lm_head": "disk",
}


def test_devices_come_from_each_module_not_from_weights(tiny_folder):
    from btp.heads import head_gates, record, start_at_layer
    from btp.models import load_model

    lm = load_model(str(tiny_folder), device_map=SPLIT)
    ad = adapter(lm.model)
    assert ad.unembed.weight.device.type == "meta" and ad.o_projs[1].weight.device.type == "meta"
    assert ad.device == lm.device == torch.device("cpu") == ad.layer_device(1) == module_device(ad.final_norm)
    wrapped = [m.__dict__.get("forward") for m in (ad.layers[0], ad.layers[1])]
    assert wrapped[1] is not None  # accelerate's hook wrapper
    ids = torch.arange(1, 9)[None]
    with record(lm.model, layer_inputs=[1]) as rec:
        lm.model(ids)
    with start_at_layer(lm.model, 1, rec["layer_in", 1]), head_gates(lm.model, torch.ones(1, 3, 4)):
        lm.model(ids)
    assert [m.__dict__.get("forward") for m in (ad.layers[0], ad.layers[1])] == wrapped  # put back, not deleted


def _run(stage, argv):
    import importlib

    return importlib.import_module(f"btp.{stage}").main(argv)


@pytest.mark.parametrize(
    "stage, extra",
    [
        ("entropy_lens", []),
        ("ablation", ["--knockout-ks", "1,2", "--random-seeds", "1", "--n-boot", "20", "--batch-rows", "8"]),
        ("taylor", ["--num-iters", "2", "--prune-per-iter", "2"]),
    ],
)
def test_device_map_run_equals_single_device_run(stage, extra, tiny_folder, tmp_path):
    argv = ["--model", str(tiny_folder), "--source", "reference", "--num-samples", "3", "--sample-max-tokens", "120"]
    argv += ["--no-progress", *extra]
    a = _run(stage, argv + ["--results-dir", str(tmp_path / "one")])
    b = _run(stage, argv + ["--results-dir", str(tmp_path / "split"), "--device-map", json.dumps(SPLIT)])
    if stage == "taylor":  # returns the records; compare the files
        fa, fb = (next((tmp_path / d).rglob("taylor/*.jsonl")) for d in ("one", "split"))
        ra, rb = ([json.loads(x) for x in f.read_text().splitlines()] for f in (fa, fb))
        drop = ("provenance", "time_scoring_s", "time_heldout_s")  # timings and the run id
        assert len(ra) == 2 and [{k: v for k, v in r.items() if k not in drop} for r in ra] == [
            {k: v for k, v in r.items() if k not in drop} for r in rb
        ]
        return
    za, zb = read_npz(a), read_npz(b)
    assert set(za) == set(zb)
    for k in za:
        if k != "provenance":
            np.testing.assert_array_equal(za[k], zb[k], err_msg=k)
    assert zb["provenance"]["config"]["device_map"] == json.dumps(SPLIT)
