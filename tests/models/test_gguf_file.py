"""The GGUF layout reader (models/gguf_file.py) against the `gguf` package's own `GGUFReader`: every metadata
value and every tensor's bytes, for the packaged SmolLM2-135M file and a file written here with every value
type; and the errors a damaged file gets."""

import re

import gguf
import numpy as np
import pytest

from nextquill_jax.models.gguf_file import read_gguf_file
from nextquill_jax.models.packaged import packaged_model_path

# GGUFReader's pseudo-fields for the header's own numbers, which are not metadata keys.
HEADER_FIELDS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}


def assert_reads_as_gguf_reader_does(path) -> None:
    ours, reference = read_gguf_file(path), gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in reference.fields.items() if k not in HEADER_FIELDS}
    assert list(ours.metadata) == list(expected)  # the file's order
    for key, value in expected.items():
        assert ours.metadata[key] == value and type(ours.metadata[key]) is type(value), key
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors, strict=True):
        assert mine.ggml_type == int(theirs.tensor_type), mine.name
        assert mine.dims == tuple(int(d) for d in theirs.shape), mine.name
        assert mine.data.dtype == np.uint8 and mine.data.shape[:-1] == theirs.data.shape[:-1], mine.name
        assert mine.data.tobytes() == theirs.data.tobytes(), mine.name


def test_the_packaged_smollm2_file_reads_as_gguf_reader_reads_it():
    assert_reads_as_gguf_reader_does(packaged_model_path("smollm2-135m"))


def _write_every_type(path, alignment: int | None = None) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for name, value_type, value in [
        ("u8", gguf.GGUFValueType.UINT8, 200),
        ("i8", gguf.GGUFValueType.INT8, -100),
        ("u16", gguf.GGUFValueType.UINT16, 60000),
        ("i16", gguf.GGUFValueType.INT16, -30000),
        ("u32", gguf.GGUFValueType.UINT32, 4_000_000_000),
        ("i32", gguf.GGUFValueType.INT32, -2_000_000_000),
        ("u64", gguf.GGUFValueType.UINT64, 2**63 + 5),
        ("i64", gguf.GGUFValueType.INT64, -(2**62)),
        ("f32", gguf.GGUFValueType.FLOAT32, 0.1),  # not exact in float32: read as the stored value
        ("f64", gguf.GGUFValueType.FLOAT64, 0.1),
        ("yes", gguf.GGUFValueType.BOOL, True),
        ("text", gguf.GGUFValueType.STRING, "héllo ▁wörld"),
        ("empty", gguf.GGUFValueType.STRING, ""),
    ]:
        writer.add_key_value(f"test.{name}", value, value_type)
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.floats", [0.5, 0.25])
    writer.add_array("test.strings", ["a", "", "ünïcode"])
    writer.add_array("test.bools", [True, False])
    writer.add_array("test.nothing", [])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.normal(size=(3, 5)).astype(np.float32))
    writer.add_tensor("f16", rng.normal(size=(7,)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.normal(size=(2, 4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# 512: the data starts at byte 1024, where rounding the header's end up to 32 (the default) gives 768; with 64
# the two coincide, so a reader ignoring `general.alignment` passed.
@pytest.mark.parametrize("alignment", [None, 64, 512])
def test_every_value_type_and_tensor_layout_reads_as_gguf_reader_reads_it(tmp_path, alignment):
    path = tmp_path / "every_type.gguf"
    _write_every_type(path, alignment)
    assert_reads_as_gguf_reader_does(path)
    tensors = {t.name: t for t in read_gguf_file(path).tensors}
    # Q8_0: blocks of 32 values in 34 bytes, 2 per row (16 in all, 544 bytes)
    assert tensors["q8"].shape == (2, 4, 64) and tensors["q8"].data.shape == (2, 4, 2 * 34)


def test_a_damaged_file_is_named_with_what_is_wrong(tmp_path):
    good = tmp_path / "good.gguf"
    _write_every_type(good)
    raw = good.read_bytes()
    cases = {
        "magic": (b"GGML" + raw[4:], r"not a GGUF file \(it starts with b'GGML'"),
        "version": (raw[:4] + (7).to_bytes(4, "little") + raw[8:], r"GGUF version 7 is not supported"),
        "version 1": (raw[:4] + (1).to_bytes(4, "little") + raw[8:], r"GGUF version 1 is not supported"),
        "header": (raw[:100], r"truncated"),
        "data": (raw[:-10], r"GGUF tensor 'q8' \(544 bytes at byte \d+\) runs past the end of the file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=message) as caught:
            read_gguf_file(path)
        assert str(path) in str(caught.value), name
    with pytest.raises(FileNotFoundError):
        read_gguf_file(tmp_path / "missing.gguf")


def _assert_refused(tmp_path, content: bytes, message: str) -> None:
    path = tmp_path / "damaged.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as caught:
        read_gguf_file(path)
    assert str(path) in str(caught.value)


def _replace_once(raw: bytes, old: bytes, new: bytes) -> bytes:
    assert raw.count(old) == 1 and len(new) == len(old), old
    return raw.replace(old, new)


@pytest.fixture
def every_type(tmp_path) -> bytes:
    path = tmp_path / "every_type.gguf"
    _write_every_type(path)
    return path.read_bytes()


@pytest.mark.parametrize("size", [0, 3, 23])
def test_an_empty_or_short_file_is_named_as_truncated(tmp_path, every_type, size):
    # mmap refused the empty file naming no file ("cannot mmap an empty file")
    _assert_refused(
        tmp_path,
        every_type[:size],
        rf": {size} bytes, shorter than a GGUF header \(24 bytes\); the file is truncated or not a GGUF "
        r"file: download or copy it again$",
    )


def test_invalid_utf8_is_named_with_its_key_and_byte(tmp_path, every_type):
    at = every_type.index("héllo".encode())  # test.text's value; é is 0xc3 0xa9
    _assert_refused(
        tmp_path,
        _replace_once(every_type, "héllo".encode(), b"h\xff\xa9llo"),
        rf"GGUF metadata 'test\.text': the string at byte {at} is not valid UTF-8 \(invalid start byte at "
        rf"byte {at + 1}\); the file is damaged$",
    )
    at = every_type.index(b"test.yes")
    _assert_refused(
        tmp_path,
        _replace_once(every_type, b"test.yes", b"test.y\xffs"),
        rf"GGUF metadata key: the string at byte {at} is not valid UTF-8 \(invalid start byte at byte "
        rf"{at + 6}\)",
    )


def test_a_metadata_key_listed_twice_is_refused(tmp_path, every_type):
    # GGUFReader and llama.cpp refuse it; the last value used to win silently
    _assert_refused(
        tmp_path,
        _replace_once(every_type, b"test.i8", b"test.u8"),
        r": GGUF metadata 'test\.u8' is listed twice$",
    )


def test_an_unknown_array_item_type_is_named_at_its_own_byte(tmp_path, every_type):
    at = every_type.index(b"test.strings") + len(b"test.strings") + 4  # after the key and the value type 9
    assert every_type[at : at + 4] == (8).to_bytes(4, "little")  # string items
    damaged = every_type[:at] + (13).to_bytes(4, "little") + every_type[at + 4 :]
    _assert_refused(
        tmp_path,
        damaged,
        rf"GGUF metadata 'test\.strings' has array item type 13 at byte {at}, which is not one of GGUF's "
        r"types \(0-12\)",
    )
    # refused before the count is used, so even an empty array of it, as llama.cpp refuses it
    at = every_type.index(b"test.ints") + len(b"test.ints") + 4
    damaged = every_type[:at] + (13).to_bytes(4, "little") + bytes(8) + every_type[at + 12 :]
    _assert_refused(tmp_path, damaged, rf"'test\.ints' has array item type 13 at byte {at}, which")


def test_a_value_type_unknown_is_named_at_its_byte(tmp_path, every_type):
    at = every_type.index(b"test.yes") + len(b"test.yes")
    damaged = every_type[:at] + (13).to_bytes(4, "little") + every_type[at + 4 :]
    _assert_refused(tmp_path, damaged, rf"GGUF metadata 'test\.yes' has value type 13 at byte {at}, which")


def test_a_string_in_an_array_past_the_end_names_its_key(tmp_path, every_type):
    at = every_type.index("ünïcode".encode())
    _assert_refused(
        tmp_path,
        every_type[: at + 2],
        rf"GGUF metadata 'test\.strings': a string of 9 bytes at byte {at} runs past the end of the file "
        rf"\({at + 2} bytes\)",
    )


def test_a_tensor_of_a_ggml_type_gguf_does_not_know_is_named_with_the_fix(tmp_path):
    """Type 99 is none of gguf's: the message named the type (its gguf version call crashed on the file's own
    version number, a TypeError, until it took the package's)."""
    from importlib.metadata import version

    good = tmp_path / "good.gguf"
    writer = gguf.GGUFWriter(str(good), "llama")
    writer.add_tensor("only_tensor", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    raw = good.read_bytes()
    at = raw.index(b"only_tensor") + len(b"only_tensor") + 4 + 8  # past the name, n_dims u32, one dim u64
    assert int.from_bytes(raw[at : at + 4], "little") == 0  # F32
    _assert_refused(
        tmp_path,
        raw[:at] + (99).to_bytes(4, "little") + raw[at + 4 :],
        rf"GGUF tensor 'only_tensor' has ggml type 99, which gguf {re.escape(version('gguf'))} does not know "
        r"\(a newer or a removed type\)\. Fix: convert or quantize the model again",
    )


def test_a_tensor_name_listed_twice_is_refused(tmp_path, every_type):
    # the tensor "f16" renamed "f32" (a name is a u64 length and its bytes); GGUFReader refuses it too
    length = (3).to_bytes(8, "little")
    _assert_refused(
        tmp_path,
        _replace_once(every_type, length + b"f16", length + b"f32"),
        r": GGUF tensor 'f32' is listed twice$",
    )


def test_an_alignment_that_is_no_power_of_two_is_refused(tmp_path):
    # GGUFWriter refuses to write 48, so 64 is written and its u32 value (type 4) replaced
    path = tmp_path / "aligned.gguf"
    _write_every_type(path, 64)
    key = b"general.alignment" + (4).to_bytes(4, "little")
    raw = _replace_once(path.read_bytes(), key + (64).to_bytes(4, "little"), key + (48).to_bytes(4, "little"))
    _assert_refused(tmp_path, raw, r": GGUF metadata 'general\.alignment' is 48, not a power of two$")


def test_a_quantized_row_that_is_not_whole_blocks_is_refused(tmp_path, every_type):
    # "q8" (Q8_0, blocks of 32 values) is listed with dims (64, 4, 2); its rows made 48 values long
    entry = (2).to_bytes(8, "little") + b"q8" + (3).to_bytes(4, "little")
    _assert_refused(
        tmp_path,
        _replace_once(every_type, entry + (64).to_bytes(8, "little"), entry + (48).to_bytes(8, "little")),
        r": GGUF tensor 'q8' has rows of 48 values, not a multiple of its type's block of 32$",
    )
