"""Official DiT checkpoint import: names, shapes, file formats and refusals."""
import jax
import numpy as np
import pytest

import reference_dit
from switch_dit_jax.models import convert

# The official DiT-S/2 (32x32x4 latents, 1000 classes, learned sigma) state dict: every
# non-block key, and the keys of one block (all 12 blocks have the same ten).
DIT_S2_SHAPES = {
    "pos_embed": (1, 256, 384),
    "x_embedder.proj.weight": (384, 4, 2, 2),
    "x_embedder.proj.bias": (384,),
    "t_embedder.mlp.0.weight": (384, 256),
    "t_embedder.mlp.0.bias": (384,),
    "t_embedder.mlp.2.weight": (384, 384),
    "t_embedder.mlp.2.bias": (384,),
    "y_embedder.embedding_table.weight": (1001, 384),
    "final_layer.adaLN_modulation.1.weight": (768, 384),
    "final_layer.adaLN_modulation.1.bias": (768,),
    "final_layer.linear.weight": (32, 384),
    "final_layer.linear.bias": (32,),
}
DIT_S2_BLOCK = {
    "attn.qkv.weight": (1152, 384),
    "attn.qkv.bias": (1152,),
    "attn.proj.weight": (384, 384),
    "attn.proj.bias": (384,),
    "mlp.fc1.weight": (1536, 384),
    "mlp.fc1.bias": (1536,),
    "mlp.fc2.weight": (384, 1536),
    "mlp.fc2.bias": (384,),
    "adaLN_modulation.1.weight": (2304, 384),
    "adaLN_modulation.1.bias": (2304,),
}
S2 = dict(name="DiT-S/2")


def dit_s2_state_dict(seed=0):
    shapes = dict(DIT_S2_SHAPES)
    for i in range(12):
        shapes.update({f"blocks.{i}.{k}": v for k, v in DIT_S2_BLOCK.items()})
    assert len(shapes) == 132
    return reference_dit.random_state_dict(shapes, seed=seed, scale=0.01)


def test_dit_s2_state_dict_loads_with_every_key_used():
    sd = dit_s2_state_dict()
    params = convert.from_torch_state_dict(sd, S2)
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    assert n + 256 * 384 == sum(int(np.prod(v.shape)) for v in sd.values()) == 32_963_360
    np.testing.assert_array_equal(params["blocks_3"]["mlp"]["fc1"]["kernel"],
                                  sd["blocks.3.mlp.fc1.weight"].T)
    np.testing.assert_array_equal(params["x_embedder"]["proj"]["kernel"][1, 0, 2],
                                  sd["x_embedder.proj.weight"][:, 2, 1, 0])


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_file_round_trip(tmp_path, suffix):
    sd = dit_s2_state_dict(seed=1)
    path = tmp_path / f"dit{suffix}"
    if suffix == ".npz":
        np.savez(path, **sd)
    else:
        from safetensors.numpy import save_file
        save_file(sd, str(path))
    loaded = convert.load_state_dict(path)
    assert set(loaded) == set(sd)
    params = convert.from_torch_state_dict(loaded, S2)
    np.testing.assert_array_equal(params["final_layer"]["linear"]["bias"],
                                  sd["final_layer.linear.bias"])


def test_renamed_key_is_refused_by_name():
    sd = dit_s2_state_dict()
    sd["blocks.0.attn.qkv_renamed.weight"] = sd.pop("blocks.0.attn.qkv.weight")
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv\.weight'"):
        convert.from_torch_state_dict(sd, S2)


def test_extra_key_is_refused_by_name():
    sd = dit_s2_state_dict()
    sd["blocks.12.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"unexpected key 'blocks\.12\.attn\.qkv\.weight'"):
        convert.from_torch_state_dict(sd, S2)


def test_missing_key_is_refused_by_name():
    sd = dit_s2_state_dict()
    del sd["t_embedder.mlp.2.bias"]
    with pytest.raises(ValueError, match=r"missing official key 't_embedder\.mlp\.2\.bias'"):
        convert.from_torch_state_dict(sd, S2)


def test_misshaped_key_is_refused_by_name():
    sd = dit_s2_state_dict()
    sd["blocks.5.mlp.fc2.weight"] = sd["blocks.5.mlp.fc2.weight"][:, :100]
    with pytest.raises(ValueError, match=r"'blocks\.5\.mlp\.fc2\.weight'.*\(100, 384\)"):
        convert.from_torch_state_dict(sd, S2)


def test_wrong_config_is_refused():
    sd = dit_s2_state_dict()
    with pytest.raises(ValueError, match="pos_embed"):  # trained for 32x32 latents
        convert.from_torch_state_dict(sd, dict(S2, input_size=64))
    with pytest.raises(ValueError, match="final_layer.linear.weight"):
        convert.from_torch_state_dict(sd, dict(S2, learn_sigma=False))


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_state_dict(tmp_path / "nope.npz")
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither .npz nor .safetensors"):
        convert.load_state_dict(tmp_path / "ckpt.pt")
