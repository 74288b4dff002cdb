"""Saved files a second writer or a damaged file changed: toy saves into one folder from several
processes do not share temporary files; JSON nested past the parser's depth, or a toy header
that is no JSON object, is a clear error."""

import multiprocessing as mp

import pytest
import torch

from l3d_lens.toy import load_toy, make_toy


def _save_many(folder: str, seed: int, barrier) -> None:
    torch.set_num_threads(1)
    toy = make_toy("tms", seed, epochs=1, n_train=50, n_l3d=10, n_eval=10, check_learned=False)
    barrier.wait(60)  # both save at once
    for _ in range(40):
        toy.save(folder)


def test_toy_saves_from_several_processes_into_one_folder(tmp_path):
    folder = str(tmp_path / "toy")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_save_many, args=(folder, s, barrier)) for s in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert load_toy(folder).seed in (0, 1)
    assert not [p.name for p in (tmp_path / "toy").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", ["decomposition.json", "toy.json"])
def test_json_nested_too_deep_is_a_clear_error(tmp_path, name):
    from l3d_lens.io import read_json_object

    file = tmp_path / name
    file.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="nested too deep"):
        read_json_object(file, "a save")


@pytest.mark.parametrize("header", ["[]", "{not json"])
def test_a_toy_header_that_is_no_json_object_is_named(tmp_path, header):
    from safetensors.torch import load_file

    from l3d_lens.io import write_safetensors

    toy = make_toy("tms", 0, epochs=1, n_train=50, n_l3d=10, n_eval=10, check_learned=False)
    folder = toy.save(tmp_path / "toy")
    tensors = load_file(str(folder / "toy.safetensors"))
    write_safetensors(tensors, folder / "toy.safetensors", {"format_version": "1", "toy": header})
    import hashlib
    import json

    meta = json.loads((folder / "toy.json").read_text())
    meta["sha256"] = hashlib.sha256((folder / "toy.safetensors").read_bytes()).hexdigest()
    (folder / "toy.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"toy\.safetensors: its header's 'toy' entry is"):
        load_toy(folder)


def test_an_ablation_projects_the_weights_it_finds_on_entering(tmp_path):
    """An ablation made before a weight change and entered after it projected the weights of
    its creation: span{v} was not out of the weights inside the block."""
    import l3d_lens
    from l3d_lens.zoo import induction

    model = induction.load()
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn.W_V"], n_subnetworks=2, rank=1, epochs=1, batch_size=4,
                             seed=0, dtype="float64")
    dec = l3d_lens.decompose(model, induction.repeated_sequences(8, seed=0), cfg, progress=False)
    v = dec.subnetworks()["blocks.0.attn.W_V"][1].double()

    def along_v() -> float:
        return float((dec.adapter.weight("blocks.0.attn.W_V").double() * v).sum())

    before = model.blocks[0].attn.W_V.detach().clone()
    base = along_v()
    ablation = dec.intervene(subnetwork=1, ablate=True)  # made here, entered below
    with dec.intervene(subnetwork=1, delta=3.0):
        with ablation:
            assert abs(along_v()) < 1e-5
        assert abs(along_v() - (base + 3.0)) < 1e-5
    assert torch.equal(model.blocks[0].attn.W_V, before)
