"""The torch-free `.pt` reader: files written by real torch.save, and files it must refuse.

`fixtures/torch_tensors.pt` and `fixtures/official_wrn10_1.pt` were written by torch 2.13
(`fixtures/make_pt_fixture.py`); the values they must read as are in the `.npz` beside them.
Every test blocks `import torch`, so none of them can pass by using PyTorch.
"""

import os
import pickle
import struct
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from fpcm_jax import models
from fpcm_jax.runs import convert, torch_zip

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(autouse=True)
def no_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError


def fixture(name):
    return os.path.join(FIXTURES, name)


def test_every_dtype_and_layout_reads_as_torch_wrote_it():
    """Strided views (transposed; two views of one storage at offsets 2 and 4, one with
    strides (3, 2)), float16/bfloat16/int64/bool/float64, a 0-d int64, a Parameter, nested
    dicts and OrderedDicts: values, dtypes and shapes equal what torch held."""
    state = torch_zip.load(fixture("torch_tensors.pt"))
    expected = dict(np.load(fixture("torch_tensors.npz")))
    read = {"nested/inner/weight": state["nested"]["inner"]["weight"],
            "nested/flag": state["nested"]["flag"],
            **{key: value for key, value in state.items() if key != "nested"}}
    assert set(read) == set(expected)
    for key, value in read.items():
        wanted = expected[key].astype(ml_dtypes.bfloat16) if key == "bfloat16" else expected[key]
        assert value.dtype == wanted.dtype and value.shape == wanted.shape, key
        np.testing.assert_array_equal(value, wanted, err_msg=key)
    assert type(state).__name__ == "OrderedDict" and type(state["nested"]["inner"]).__name__ \
        == "OrderedDict"
    np.testing.assert_array_equal(state["shared_grid"], [[2.0, 3.0], [3.5, 4.5]])
    assert state["bn.num_batches_tracked"].shape == () and state["bn.num_batches_tracked"] == 7
    state["shared_head"][:] = -1.0  # views of one storage come back as independent copies
    assert state["shared_grid"][0, 0] == 2.0


def test_official_pt_converts_and_gives_the_official_logits(tmp_path):
    """`model.state_dict()` of the official WideResNet(10, widen 1), saved by torch as the
    official train.py saves it, converts without torch: its arrays equal the synthetic weights,
    the logits those of the official model (recorded beside it), also after an export to .npz."""
    from official_weights import synthetic_state_dict

    state = torch_zip.load(fixture("official_wrn10_1.pt"))
    expected = synthetic_state_dict({key: value.shape for key, value in state.items()})
    for key, value in state.items():
        assert value.dtype == expected[key].dtype, key
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    model = models.create("wrn-10-1")
    recorded = np.load(fixture("official_wrn10_1.npz"))
    variables = convert.from_official(fixture("official_wrn10_1.pt"), model)
    logits = np.asarray(model.apply(variables, recorded["x"], train=False))
    np.testing.assert_allclose(logits, recorded["logits"], rtol=1e-4, atol=1e-4)
    exported = convert.to_official(variables)
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in state.items()}
    for key, value in state.items():
        assert exported[key].dtype == value.dtype, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def write_pt(path, pickled, records=None, byteorder=b"little"):
    """A zip laid out as torch.save writes it, around hand-made pickle bytes."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", byteorder)
        for key, raw in (records or {}).items():
            archive.writestr(f"archive/data/{key}", raw)
    return str(path)


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class CallsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("make", [
    lambda marker: RunsACommand(marker),
    lambda marker: {"conv.weight": 1.0, "payload": CallsEval(marker)},
    lambda marker: {"model": {"fc.bias": [RunsACommand(marker)]}},
], ids=["os.system", "eval-inside-a-dict", "nested"])
def test_pickled_code_is_refused_without_running_it(tmp_path, make):
    marker = tmp_path / "pwned"
    path = write_pt(tmp_path / "evil.pt", pickle.dumps(make(marker), protocol=2))
    with pytest.raises(torch_zip.TorchFileError,
                       match=r"evil.pt contains \S+, which is not a tensor or dict; fpcm-jax "
                             r"reads only tensors and dicts \(it never runs pickled code\)"):
        convert.load_state_dict(path)
    assert not marker.exists()


class Net:
    """Stands for a model class: torch.save(model) pickles it by name."""


def test_whole_model_pickles_are_refused_by_name(tmp_path):
    path = write_pt(tmp_path / "model.pt", pickle.dumps({"net": Net()}, protocol=2))
    with pytest.raises(torch_zip.TorchFileError, match=r"contains test_torch_zip.Net, .*"
                                                       r"torch.save\(model.state_dict\(\), path\)"):
        torch_zip.load(path)


@pytest.mark.parametrize("state", [b"N}X\x0c\x00\x00\x00__defaults__(I1\nts\x86",
                                   b"}X\x0c\x00\x00\x00__defaults__(I1\nts"],
                         ids=["slot-state", "dict-state"])
def test_pickles_cannot_modify_the_functions_they_may_call(tmp_path, state):
    """A BUILD opcode on an allowed function (which would set its `__defaults__`) is refused."""
    defaults = torch_zip._rebuild_tensor_v2.__defaults__
    pickled = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + state + b"b."
    with pytest.raises(torch_zip.TorchFileError, match="build.pt.*(tries to set '__defaults__'|"
                                                       "no attribute '__dict__')"):
        torch_zip.load(write_pt(tmp_path / "build.pt", pickled))
    assert torch_zip._rebuild_tensor_v2.__defaults__ == defaults


def tensor_pickle(offset, size, stride, storage_type="FloatStorage", numel=4):
    """Protocol-2 pickle bytes of {'w': _rebuild_tensor_v2(storage '0', offset, size, stride)}
    written opcode by opcode, as torch.save writes a tensor."""
    def text(value):
        raw = value.encode()
        return b"X" + len(raw).to_bytes(4, "little") + raw

    def ints(values):
        return b"(" + b"".join(b"I%d\n" % v for v in values) + b"t"

    storage = (b"(" + text("storage") + f"ctorch\n{storage_type}\n".encode() + text("0")
               + text("cpu") + b"I%d\n" % numel + b"tQ")
    tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"I%d\n" % offset
              + ints(size) + ints(stride) + b"\x89" + b"ccollections\nOrderedDict\n)R" + b"tR")
    return b"\x80\x02}" + text("w") + tensor + b"s."


def test_hand_written_tensor_pickles_read_with_offset_stride_and_byte_order(tmp_path):
    values = np.arange(4, dtype=np.float32)
    little = write_pt(tmp_path / "a.pt", tensor_pickle(1, (2,), (2,)), {"0": values.tobytes()})
    np.testing.assert_array_equal(torch_zip.load(little)["w"], [1.0, 3.0])
    big = write_pt(tmp_path / "b.pt", tensor_pickle(0, (2, 2), (1, 2)),
                   {"0": values.astype(">f4").tobytes()}, byteorder=b"big")
    np.testing.assert_array_equal(torch_zip.load(big)["w"], [[0.0, 2.0], [1.0, 3.0]])


@pytest.mark.parametrize("offset, size, stride, problem", [
    (3, (2,), (1,), "reaches element 4 of a storage of 4"),
    (0, (2, 2), (3, 1), "reaches element 4 of a storage of 4"),
    (0, (2,), (-1,), "malformed layout"),
    (0, (2, 2), (1,), "malformed layout"),
])
def test_tensors_reaching_outside_their_storage_are_refused(tmp_path, offset, size, stride,
                                                            problem):
    path = write_pt(tmp_path / "bad.pt", tensor_pickle(offset, size, stride),
                    {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(torch_zip.TorchFileError, match=f"bad.pt: a tensor .*{problem}"):
        torch_zip.load(path)


def test_files_that_are_not_torch_zips_name_the_fix(tmp_path):
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
    with pytest.raises(torch_zip.TorchFileError, match="legacy format.*torch >= 1.6"):
        convert.load_state_dict(str(legacy))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not really")
    with pytest.raises(torch_zip.TorchFileError, match="garbage.pt is not a PyTorch checkpoint"):
        convert.load_state_dict(str(garbage))
    other_zip = tmp_path / "other.pt"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(torch_zip.TorchFileError, match="no <name>/data.pkl"):
        convert.load_state_dict(str(other_zip))
    missing = write_pt(tmp_path / "missing.pt", tensor_pickle(0, (2,), (1,)))
    with pytest.raises(torch_zip.TorchFileError, match="lacks its record archive/data/0"):
        convert.load_state_dict(missing)
    a_list = write_pt(tmp_path / "list.pt", pickle.dumps([1, 2], protocol=2))
    with pytest.raises(convert.ConversionError, match="holds a list, not a state_dict"):
        convert.load_state_dict(a_list)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        convert.load_state_dict(str(tmp_path / "nope.pt"))


def data_start(path, info):
    """Where a record's bytes start: after its local header, whose extra field may differ from
    the central directory's."""
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
    return info.header_offset + 30 + name_length + extra_length


def records(path):
    with zipfile.ZipFile(path) as archive:
        return {info.filename.split("/", 1)[1]: (archive.read(info), data_start(path, info))
                for info in archive.infolist()}


def test_written_files_equal_what_torch_save_writes_record_by_record(tmp_path):
    """The same state dict written by torch.save (the fixture) and by `torch_zip.save`: equal
    pickles byte for byte, equal storage records, each starting at a multiple of 64."""
    source = fixture("torch_state_dict.pt")
    ours = tmp_path / "ours.pt"
    with open(ours, "wb") as handle:
        torch_zip.save(handle, torch_zip.load(source))
    theirs, written = records(source), records(ours)
    theirs.pop(".data/serialization_id")  # a random id per file
    assert set(written) == set(theirs)
    for name, (raw, start) in theirs.items():
        assert written[name][0] == raw, name
        if name.startswith("data/"):
            assert start % 64 == 0 and written[name][1] % 64 == 0, name
    assert sum(name.startswith("data/") for name in written) == 5


def test_writing_refuses_what_torch_cannot_hold(tmp_path):
    with open(tmp_path / "x.pt", "wb") as handle:
        with pytest.raises(torch_zip.TorchFileError, match="'names' has dtype <U1"):
            torch_zip.save(handle, {"names": np.array(["a", "b"])})
