"""Bad model and volume files given to `ctxai explain` / `ctxai layers`: refused at once, in one line, exit 2."""

from __future__ import annotations

import os
import shutil
import zipfile

import pytest

from conftest import ctxai, digests, one_error_line


def damage_largest_tensor(path) -> str:
    """Flip up to 4 KiB inside the largest tensor of a TorchScript archive, leaving its stored CRC as it was."""
    with zipfile.ZipFile(path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # The local header is 30 bytes plus the name and extra field, whose lengths sit at bytes 26-29.
    name_len = int.from_bytes(data[member.header_offset + 26:member.header_offset + 28], "little")
    extra_len = int.from_bytes(data[member.header_offset + 28:member.header_offset + 30], "little")
    start = member.header_offset + 30 + name_len + extra_len
    for offset in range(start, start + min(4096, member.file_size)):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return member.filename


@pytest.fixture
def damaged(tmp_path, torchscript_card):
    folder = tmp_path / "model"
    shutil.copytree(torchscript_card.parent, folder)
    member = damage_largest_tensor(folder / "ts.pt")
    bare = tmp_path / "bare" / "bare.pt"
    bare.parent.mkdir()
    shutil.copy(folder / "ts.pt", bare)
    return folder / "ts.json", bare, member


def test_fail1_damaged_torchscript_is_refused_naming_the_member(tmp_path, damaged, volume_file):
    card, bare, member = damaged
    before = digests(volume_file.parent)
    for model in (card, bare):
        out = ctxai("explain", "--volume", volume_file, "--model", model, "--method", "saliency", "--device", "cpu",
                    "--out", tmp_path / "out", "--quiet")
        one_error_line(out, "damaged", member)
        layers = ctxai("layers", "--model", model)
        one_error_line(layers, "damaged", member)
    assert not (tmp_path / "out").exists()
    assert digests(volume_file.parent) == before


def test_weak_truncated_torchscript_is_called_damaged_or_truncated(tmp_path, torchscript_card):
    folder = tmp_path / "model"
    shutil.copytree(torchscript_card.parent, folder)
    data = (folder / "ts.pt").read_bytes()
    (folder / "ts.pt").write_bytes(data[:len(data) // 2])
    line = one_error_line(ctxai("layers", "--model", folder / "ts.json"), "truncated")
    assert "not a TorchScript archive" not in line


@pytest.mark.parametrize("option", ["--model", "--volume", "card"])
def test_fail2_non_regular_files_are_refused_at_once(tmp_path, option, volume_file, classifier_card):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    model, volume = classifier_card, volume_file
    if option == "--model":
        model = "/dev/zero"
    elif option == "--volume":
        volume = fifo
    else:
        weights = tmp_path / "w.pt"
        shutil.copy(classifier_card.with_suffix(".pt"), weights)
        os.mkfifo(tmp_path / "w.json")  # the card a bare weights file is looked up by
        model = weights
    # A reader of /dev/zero or of a FIFO nobody writes to never returns: the timeout is the failure.
    out = ctxai("explain", "--volume", volume, "--model", model, "--method", "saliency", "--device", "cpu",
                "--out", tmp_path / "out", "--quiet", timeout=60)
    one_error_line(out, "not a regular file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["model", "card"])
def test_weak_model_or_card_that_is_a_directory_is_one_line(tmp_path, what, classifier_card):
    if what == "model":
        model = tmp_path
    else:
        model = tmp_path / "w.pt"
        shutil.copy(classifier_card.with_suffix(".pt"), model)
        (tmp_path / "w.json").mkdir()
    one_error_line(ctxai("layers", "--model", model), "is a directory")


def test_weak_singular_direction_matrix_keeps_itks_reason(tmp_path, classifier_card):
    header = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 4 4 4\n"
              "space directions: (1,0,0) (1,0,0) (0,0,1)\nkinds: domain domain domain\nendian: little\n"
              "encoding: raw\nspace origin: (0,0,0)\n\n")
    (tmp_path / "singular.nrrd").write_bytes(header.encode() + bytes(4 * 64))
    out = ctxai("explain", "--volume", tmp_path / "singular.nrrd", "--model", classifier_card, "--method",
                "saliency", "--device", "cpu", "--quiet", "--out", tmp_path / "out")
    one_error_line(out, "singular.nrrd", "determinant is 0")
