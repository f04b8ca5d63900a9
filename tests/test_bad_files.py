"""Every bad file a user can hand us is one sentence naming the file (and key or record).

Weights (`.npz` / `.safetensors`, DiT and VAE), evaluation batches and Inception weights
(`.npz`), and ArrayRecord latent shards: truncated, empty, corrupt, foreign, pickled, of an
unsupported dtype, or holding NaN / inf / out-of-range values.
"""
import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save_file

from switch_dit_jax import files
from switch_dit_jax.data.sources import (LatentSource, _HEADER, encode_latent_record,
                                         write_latent_shards)
from switch_dit_jax.errors import BadFileError
from switch_dit_jax.models import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_names_file(error: Exception, path, *more: str) -> None:
    message = str(error)
    assert "\n" not in message and message.endswith("."), message
    assert str(path) in message, (str(path), message)
    for text in more:
        assert text in message, (text, message)


# ----------------------------------------------------------------------------- .npz

class Marker:
    """Unpickling this creates a directory: proof that a loader unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _npz_bytes(tmp_path, compressed=False, **arrays):
    path = tmp_path / "src.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path.read_bytes()


def _zip_with(payload):
    """A zip of two members: `arr_0` (read by the sample readers) and `mu` (by the reference
    reader), both holding `payload`."""
    def make(path):
        with zipfile.ZipFile(path, "w") as z:
            for name in ("arr_0.npy", "mu.npy"):
                z.writestr(name, payload)
    return make


def _npy_header(shape, descr="<f4", version=b"\x01\x00"):
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    text += b" " * (63 - (len(text) + 10) % 64) + b"\n"
    return b"\x93NUMPY" + version + struct.pack("<H", len(text)) + text


def _flip(data: bytes, at: int) -> bytes:
    data = bytearray(data)
    data[at] ^= 0xFF
    return bytes(data)


def _flip_each_member(data: bytes, path) -> bytes:
    """A byte of every member's array data flipped: the zip directory stays intact."""
    path.write_bytes(data)
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    for info in infos:
        local = 30 + len(info.filename.encode()) + len(info.extra)
        data = _flip(data, info.header_offset + local + 200)
    return data


def npz_cases(tmp_path):
    arrays = dict(arr_0=np.ones((64, 64), np.float32), mu=np.ones(2048, np.float32))
    good = _npz_bytes(tmp_path, **arrays)
    packed = _npz_bytes(tmp_path, True, arr_0=np.random.default_rng(0).random((64, 64)))
    marker = np.array([Marker(str(tmp_path / "UNPICKLED"))], dtype=object)
    return {
        "empty": lambda p: p.write_bytes(b""),
        "half": lambda p: p.write_bytes(good[:len(good) // 2]),
        "last_bytes_cut": lambda p: p.write_bytes(good[:-10]),
        "random_bytes": lambda p: p.write_bytes(os.urandom(4096)),
        "text": lambda p: p.write_text("this is not an archive\n"),
        "compressed_half": lambda p: p.write_bytes(packed[:len(packed) // 2]),
        "bad_crc": lambda p: p.write_bytes(_flip_each_member(good, p)),
        "not_npy_member": lambda p: zipfile.ZipFile(p, "w").writestr("readme.txt", b"hello"),
        "bad_npy_magic": _zip_with(b"GARBAGE" * 20),
        "npy_version_9": _zip_with(_npy_header((4,), version=b"\x09\x00") + b"\0" * 16),
        "member_cut_short": _zip_with(_npy_header((1000,)) + b"\0" * 100),
        "pickled_objects": lambda p: np.savez(p, arr_0=marker, mu=marker),
    }


def _all_images(path):
    from switch_dit_jax.eval import metrics
    images = metrics.NpzImages(path)
    return images[0:len(images)]


NPZ_CASES = ["empty", "half", "last_bytes_cut", "random_bytes", "text", "compressed_half",
             "bad_crc", "not_npy_member", "bad_npy_magic", "npy_version_9", "member_cut_short",
             "pickled_objects"]


@pytest.mark.parametrize("case", NPZ_CASES)
def test_bad_npz_everywhere_it_is_read(tmp_path, case):
    """The same bad file through every reader: weights, references, samples, Inception."""
    from switch_dit_jax.eval import load_network, metrics
    path = tmp_path / "bad.npz"
    npz_cases(tmp_path)[case](path)
    for read in (files.load_npz, convert.load_state_dict, metrics.load_reference,
                 _all_images, load_network):
        with pytest.raises(BadFileError) as info:
            read(str(path))
        assert_names_file(info.value, path)
    assert not (tmp_path / "UNPICKLED").exists()


@pytest.mark.parametrize("case", NPZ_CASES)
def test_bad_npz_in_a_workdir(tmp_path, case):
    """The digits classifier cache and --mode=eval's newest samples file, each named."""
    from switch_dit_jax.config_base import load_config
    from switch_dit_jax.eval import digits
    from switch_dit_jax.train.loop import evaluate_workdir
    cache = tmp_path / digits.CACHE_FILE
    samples = tmp_path / "samples" / "samples_00000001.npz"
    for path, read in ((cache, lambda: digits.classifier_weights(str(tmp_path))),
                       (samples, lambda: evaluate_workdir(
                           load_config(os.path.join(ROOT, "configs", "quickstart.py")),
                           str(tmp_path)))):
        path.parent.mkdir(parents=True, exist_ok=True)
        npz_cases(tmp_path)[case](path)
        with pytest.raises(BadFileError) as info:
            read()
        assert_names_file(info.value, path)
    assert not (tmp_path / "UNPICKLED").exists()


@pytest.mark.parametrize("value,text", [
    (np.ones((2, 2), np.int32), "int32"),
    (np.ones(3, np.complex64), "complex64"),
    (np.array(["a", "b"]), "<U1"),
    (np.array([1.0, np.nan], np.float32), "NaN"),
    (np.array([np.inf, 1.0], np.float64), "NaN or inf"),
    (np.array([-np.inf], np.float16), "NaN or inf"),
], ids=["int32", "complex", "strings", "nan", "inf_f64", "ninf_f16"])
def test_npz_weights_of_the_wrong_kind_name_the_key(tmp_path, value, text):
    path = tmp_path / "dit.npz"
    np.savez(path, **{"blocks.0.attn.qkv.weight": value, "pos_embed": np.zeros(4, np.float32)})
    with pytest.raises(BadFileError) as info:
        convert.load_state_dict(path)
    assert_names_file(info.value, path, "'blocks.0.attn.qkv.weight'", text)


# ----------------------------------------------------------------------------- .safetensors

def _safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _bf16(values) -> bytes:
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


def safetensors_cases(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file({"a": np.ones((32, 32), np.float32), "b": np.zeros(8, np.float32)}, str(src))
    good = src.read_bytes()
    one = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    return {
        "empty": lambda p: p.write_bytes(b""),
        "four_bytes": lambda p: p.write_bytes(b"\x01\x02\x03\x04"),
        "half": lambda p: p.write_bytes(good[:len(good) // 2]),
        "data_cut": lambda p: p.write_bytes(good[:-10]),
        "random_bytes": lambda p: p.write_bytes(os.urandom(2048)),
        "huge_header": lambda p: p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}"),
        "header_not_json": lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 16),
        "header_a_list": lambda p: p.write_bytes(_safetensors([1, 2], b"")),
        "no_offsets": lambda p: p.write_bytes(_safetensors(
            {"a": {"dtype": "F32", "shape": [4]}}, b"\0" * 16)),
        "size_mismatch": lambda p: p.write_bytes(_safetensors(
            {"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}, b"\0" * 16)),
        "beyond_the_end": lambda p: p.write_bytes(_safetensors(one, b"\0" * 8)),
        "unknown_dtype": lambda p: p.write_bytes(_safetensors(
            {"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4)),
    }


SAFETENSORS_CASES = ["empty", "four_bytes", "half", "data_cut", "random_bytes", "huge_header",
                     "header_not_json", "header_a_list", "no_offsets", "size_mismatch",
                     "beyond_the_end", "unknown_dtype"]


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_bad_safetensors_dit_and_vae(tmp_path, case):
    from switch_dit_jax import vae as vae_lib
    path = tmp_path / "bad.safetensors"
    safetensors_cases(tmp_path)[case](path)
    with pytest.raises(BadFileError) as info:
        convert.load_state_dict(path)
    assert_names_file(info.value, path)
    with pytest.raises(vae_lib.VAEWeightsError) as info:
        vae_lib.load_vae(str(path), block_out_channels=(8, 16), norm_num_groups=4)
    assert_names_file(info.value, path)


@pytest.mark.parametrize("dtype,text", [("I32", "int32"), ("I64", "int64"), ("BOOL", "bool"),
                                        ("U8", "uint8")])
def test_integer_safetensors_weights_name_key_and_dtype(tmp_path, dtype, text):
    size = {"I32": 4, "I64": 8, "BOOL": 1, "U8": 1}[dtype] * 4
    path = tmp_path / "int.safetensors"
    path.write_bytes(_safetensors({"pos_embed": {"dtype": dtype, "shape": [4],
                                                 "data_offsets": [0, size]}}, b"\0" * size))
    with pytest.raises(BadFileError) as info:
        convert.load_state_dict(path)
    assert_names_file(info.value, path, "'pos_embed'", text)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
def test_nonfinite_safetensors_weights_name_the_key(tmp_path, dtype):
    values = np.array([1.0, np.nan, np.inf, 2.0], np.float32)
    data = {"F16": values.astype("<f2").tobytes(), "BF16": _bf16(values),
            "F32": values.astype("<f4").tobytes()}[dtype]
    path = tmp_path / "nan.safetensors"
    path.write_bytes(_safetensors({"x_embedder.proj.bias": {
        "dtype": dtype, "shape": [4], "data_offsets": [0, len(data)]}}, data))
    with pytest.raises(BadFileError) as info:
        convert.load_state_dict(path)
    assert_names_file(info.value, path, "'x_embedder.proj.bias'", "2 NaN or inf")


def test_vae_weights_with_int_or_nan_tensors_name_the_tensor(tmp_path):
    from switch_dit_jax import vae as vae_lib
    arch = dict(block_out_channels=(8, 16), norm_num_groups=4)
    model = vae_lib.build_autoencoder(**arch)
    params = vae_lib.numpy_params(model, 0)
    good = str(tmp_path / "vae.safetensors")
    vae_lib.save_diffusers(params, good)
    tensors = {k: np.asarray(v) for k, v in files.SafetensorsFile(good).load().items()}
    name = "decoder.conv_out.bias"
    for bad, text in ((tensors[name].astype(np.int32), "int32"),
                      (np.full_like(tensors[name], np.nan), "NaN")):
        path = tmp_path / f"vae_{text}.safetensors"
        save_file(dict(tensors, **{name: bad}), str(path))
        with pytest.raises(vae_lib.VAEWeightsError) as info:
            vae_lib.load_vae(str(path), **arch)
        assert_names_file(info.value, path, f"'{name}'", text)


def test_half_precision_checkpoints_are_accepted(tmp_path):
    """Released checkpoints are often float16 / bfloat16: cast, and pos_embed still matches."""
    import test_convert
    sd = test_convert.dit_s2_state_dict(seed=2)
    half = tmp_path / "dit16.safetensors"
    save_file({k: v.astype(np.float16) for k, v in sd.items()}, str(half))
    params = convert.from_torch_state_dict(convert.load_state_dict(half), test_convert.S2)
    np.testing.assert_allclose(params["final_layer"]["linear"]["bias"],
                               sd["final_layer.linear.bias"], atol=1e-3)
    header = {k: {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [0, 0]}
              for k, v in sd.items()}
    data, offset = b"", 0
    for k, v in sd.items():
        raw = _bf16(v)
        header[k]["data_offsets"] = [offset, offset + len(raw)]
        data, offset = data + raw, offset + len(raw)
    bf16 = tmp_path / "ditbf16.safetensors"
    bf16.write_bytes(_safetensors(header, data))
    loaded = convert.load_state_dict(bf16)
    assert loaded["pos_embed"].dtype == np.float32
    convert.from_torch_state_dict(loaded, test_convert.S2)
    with pytest.raises(ValueError, match="pos_embed' differs"):  # another table is refused
        convert.from_torch_state_dict(dict(loaded, pos_embed=loaded["pos_embed"][:, ::-1]),
                                      test_convert.S2)


# ----------------------------------------------------------------------------- latent shards

SHAPE = (4, 4, 4)


def _shards(tmp_path, n=40, means=None, stds=None):
    d = tmp_path / "shards"
    means = np.zeros((n, *SHAPE), np.float32) if means is None else means
    stds = np.ones((n, *SHAPE), np.float32) if stds is None else stds
    paths = write_latent_shards(str(d), means, stds, np.arange(n) % 10, num_shards=2,
                                num_classes=10)
    return str(d), paths[1]


def _raw_shard(path, records):
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()


def _record(label=1, num_classes=10, shape=SHAPE, mean=0.0, std=1.0):
    return encode_latent_record(np.full(shape, mean), np.full(shape, std), label, num_classes)


def _nan_at(field, value):
    def make(tmp_path):
        arrays = {"means": np.zeros((40, *SHAPE), np.float32),
                  "stds": np.ones((40, *SHAPE), np.float32)}
        arrays[field][27, 1, 2, 3] = value  # record 7 of the second shard
        return _shards(tmp_path, **arrays)
    return make


def _rewrite(transform):
    def make(tmp_path):
        d, second = _shards(tmp_path)
        data = open(second, "rb").read()
        open(second, "wb").write(transform(data))
        return d, second
    return make


def _extra_shard(records):
    def make(tmp_path):
        d, _ = _shards(tmp_path)
        path = os.path.join(d, "zz-extra.array_record")
        _raw_shard(path, records)
        return d, path
    return make


SHARD_CASES = {
    "empty": (_rewrite(lambda b: b""), None),
    "half": (_rewrite(lambda b: b[:len(b) // 2]), None),
    "last_bytes_cut": (_rewrite(lambda b: b[:-10]), None),
    "chunk_header_flipped": (_rewrite(lambda b: _flip(b, 100)), "record 0"),
    "block_header_flipped": (_rewrite(lambda b: _flip(b, len(b) // 2)), None),
    "random_bytes": (_rewrite(lambda b: os.urandom(70000)), None),
    "foreign_records": (_extra_shard([b"JUNK" * 10]), "record 0"),
    "record_too_short": (_extra_shard([_record(), b"SDL"]), "record 1"),
    "record_length_wrong": (_extra_shard([_record()[:-4]]), "record 0"),
    "header_shape_zero": (_extra_shard([_HEADER.pack(b"SDL1", 0, 4, 4, 1, 10)]), "record 0"),
    "other_shape": (_extra_shard([_record(), _record(shape=(8, 8, 4))]), "record 1"),
    "other_num_classes": (_extra_shard([_record(num_classes=100)]), "record 0"),
    "label_too_large": (_extra_shard([_record(), _record(), _record(label=12)]), "record 2"),
    "label_negative": (_extra_shard([_record(label=-1)]), "record 0"),
    "nan_mean": (_nan_at("means", np.nan), "record 7"),
    "inf_std": (_nan_at("stds", np.inf), "record 7"),
    "negative_std": (_extra_shard([_record(std=-1.0)]), "record 0"),
}


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_bad_latent_shard_names_file_and_record(tmp_path, case):
    make, where = SHARD_CASES[case]
    data_dir, bad = make(tmp_path)
    with pytest.raises(BadFileError) as info:
        source = LatentSource(data_dir)
        for i in range(len(source)):
            source[i]
    assert_names_file(info.value, bad, *([where] if where else []))
    if "label" in case:
        assert "num_classes=10" in str(info.value)


def test_a_bad_record_stops_the_data_pipeline_with_its_name(tmp_path):
    import ml_collections
    from switch_dit_jax.data import make_train_loader
    data_dir, bad = _nan_at("means", np.nan)(tmp_path)
    config = ml_collections.ConfigDict(dict(name="latents", dir=data_dir, hflip=False,
                                            latent_scale=0.18215, num_workers=0, seed=0))
    loader = iter(make_train_loader(config, 8))
    with pytest.raises(BadFileError) as info:
        for _ in range(10):  # 5 batches an epoch: the bad record comes in the first two epochs
            next(loader)
    assert_names_file(info.value, bad, "record 7")


def test_bad_shard_through_main_is_one_line(tmp_path):
    data_dir, bad = _nan_at("means", np.nan)(tmp_path)
    cmd = [sys.executable, "-m", "switch_dit_jax.main",
           f"--config={ROOT}/configs/quickstart.py", f"--workdir={tmp_path / 'run'}",
           "--config.data.name=latents", f"--config.data.dir={data_dir}",
           "--config.model.input_size=4", "--config.model.in_channels=4",
           "--config.model.patch_size=2", "--config.model.depth=1",
           "--config.model.hidden_size=32", "--config.model.num_heads=2",
           "--config.train.global_batch_size=8", "--config.train.num_steps=20",
           "--config.train.sample_every=0"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and bad in errors[0] and "record 7" in errors[0], out.stderr[-3000:]


def test_enough_distinct_bad_files():
    count = (len(NPZ_CASES) + 6 + len(SAFETENSORS_CASES) + 4 + 3 + 2 + len(SHARD_CASES))
    assert count >= 40
