"""Image shards: writing from each source, reading back, the embedded digits, augmentation, bad data, CLI."""

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pretrain.data.images import INDEX_FORMAT, EvalTransform, ImageDecoder, TrainTransform, decode_image
from pretrain.errors import UserError
from pretrain.prepare.embedded import digits_samples, prepare_digits
from pretrain.prepare.images import Encoded, ImageSource, csv_samples, image_folder_samples, prepare_image_shards
from pretrain.prepare.writer import PROGRESS_NAME

REPO = Path(__file__).resolve().parents[1]
N_DIGITS = 1797
UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # normalised output == pixel values


def read_samples(directory: str, storage_options: dict | None = None) -> tuple[dict, list[tuple[str, dict]]]:
    """The index and every (shard url, raw sample) of a shard set, through fsspec as training reads it."""
    with fsspec.open(f"{directory}/index.json", "r", **(storage_options or {})) as f:
        index = json.load(f)
    samples = []
    for shard in index["shards"]:
        url = f"{directory}/{shard['name']}"
        with fsspec.open(url, "rb", **(storage_options or {})) as stream:
            files = ({**m, "__url__": url} for m in tar_file_iterator(stream))
            samples.extend((url, s) for s in group_by_keys(files))
    return index, samples


def image_bytes(size: tuple[int, int], fmt: str, mode: str = "RGB", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels).save(buf, format=fmt)
    return buf.getvalue()


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prepare_image_shards(digits_samples(), str(out), 500)
    return out


@pytest.fixture
def folder(tmp_path) -> Path:
    """An ImageFolder tree: PNG and JPEG, nested, plus entries that are not samples."""
    root = tmp_path / "tree"
    files = {
        "cat/a.png": image_bytes((40, 30), "PNG"),
        "cat/b.JPG": image_bytes((60, 80), "JPEG", seed=1),
        "cat/small.png": image_bytes((16, 12), "PNG", mode="L", seed=2),
        "dog/sub/c.jpeg": image_bytes((50, 50), "JPEG", seed=3),
        "dog/d.gif": image_bytes((30, 45), "GIF", mode="L", seed=4),
        "dog/notes.txt": b"not an image",
        "dog/._c.jpeg": b"macOS resource fork",
        ".ipynb_checkpoints/x.png": image_bytes((8, 8), "PNG"),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


# --------------------------------------------------------------------------- writing + sources


def test_digits_round_trip(digits_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    index, samples = read_samples(str(digits_dir))
    assert index["format"] == INDEX_FORMAT and index["version"] == 1
    assert index["classes"] == [str(i) for i in range(10)] and index["num_classes"] == 10
    assert [s["samples"] for s in index["shards"]] == [500, 500, 500, 297]
    assert index["total_samples"] == len(samples) == N_DIGITS
    assert [int(s["cls"]) for _, s in samples] == digits.target.tolist()
    expected = np.rint(digits.images * 255 / 16).astype(np.uint8)
    for i in (0, 1, 900, N_DIGITS - 1):
        url, sample = samples[i]
        assert sample["__key__"] == f"{i:09d}" and "png" in sample
        rgb = np.array(decode_image(sample["png"], sample["__key__"]))
        assert rgb.shape == (8, 8, 3) and all((rgb[..., c] == expected[i]).all() for c in range(3))


def test_same_input_gives_identical_bytes(digits_dir, tmp_path):
    prepare_image_shards(digits_samples(), str(tmp_path), 500)
    names = sorted(p.name for p in digits_dir.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    assert all((digits_dir / n).read_bytes() == (tmp_path / n).read_bytes() for n in names)


def test_prepare_digits_once_and_waiters(tmp_path):
    results = []
    waiter = threading.Thread(
        target=lambda: results.append(prepare_digits(str(tmp_path), 1000, is_preparer=False, poll_interval_s=0.05))
    )
    waiter.start()
    path = prepare_digits(str(tmp_path), 1000, is_preparer=True)
    waiter.join(timeout=30)
    assert results == [path]
    index = Path(path, "index.json")
    assert json.loads(index.read_text())["total_samples"] == 1498  # the train split: all but every 6th
    mtime = index.stat().st_mtime_ns
    assert prepare_digits(str(tmp_path), 1000, is_preparer=True) == path and index.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [Path(path).name]  # no temporary left behind
    with pytest.raises(UserError, match="waited"):
        prepare_digits(str(tmp_path / "empty"), 1000, is_preparer=False, wait_timeout_s=0.1, poll_interval_s=0.05)


def test_digits_splits_partition_the_set():
    train, val = list(digits_samples("train").samples()), list(digits_samples("val").samples())
    assert (len(train), len(val)) == (1498, 299) and len(train) + len(val) == N_DIGITS
    every = list(digits_samples().samples())
    assert val == every[5::6] and set(map(tuple, train)).isdisjoint(map(tuple, val))


def test_image_folder_keeps_files_as_they_are(folder, tmp_path):
    source = image_folder_samples(str(folder))
    assert source.classes == ["cat", "dog"] and len(source.items) == 5
    prepare_image_shards(source, str(tmp_path / "out"), 2)
    index, samples = read_samples(str(tmp_path / "out"))
    assert [s["samples"] for s in index["shards"]] == [2, 2, 1]
    got = [(next(k for k in ("jpg", "png") if k in s), int(s["cls"])) for _, s in samples]
    assert got == [("png", 0), ("jpg", 0), ("png", 0), ("png", 1), ("jpg", 1)]  # sorted paths, per class
    assert samples[0][1]["png"] == (folder / "cat/a.png").read_bytes()
    assert samples[1][1]["jpg"] == (folder / "cat/b.JPG").read_bytes()
    gif = opened(samples[3][1]["png"])  # d.gif, re-encoded losslessly
    assert gif.size == (30, 45)
    assert (np.array(gif.convert("L")) == np.array(Image.open(folder / "dog/d.gif").convert("L"))).all()


def test_image_folder_short_side(folder):
    source = image_folder_samples(str(folder), short_side=20)
    sizes = [(ext, opened(data).format, opened(data).size) for data, ext, _ in source.samples()]
    assert sizes == [
        ("png", "PNG", (27, 20)),
        ("jpg", "JPEG", (20, 27)),
        ("png", "PNG", (16, 12)),
        ("png", "PNG", (20, 30)),
        ("jpg", "JPEG", (20, 20)),
    ]


def test_csv_labels_names_and_ints(folder, tmp_path):
    named = tmp_path / "named.csv"
    named.write_text(f"file,species\ncat/a.png,tabby\n\n{folder}/dog/sub/c.jpeg,beagle\ncat/b.JPG,tabby\n")
    (tmp_path / "cat").symlink_to(folder / "cat")
    source = csv_samples(str(named), short_side=20)
    assert source.classes == ["beagle", "tabby"]
    got = [(ext, label, opened(data).size) for data, ext, label in source.samples()]
    assert got == [("png", 1, (27, 20)), ("jpg", 0, (20, 20)), ("jpg", 1, (20, 27))]
    numbered = tmp_path / "numbered.csv"
    numbered.write_text("path,label\ncat/a.png,3\ncat/b.JPG,0\n")
    source = csv_samples(str(numbered))
    assert source.classes == ["0", "1", "2", "3"]
    assert [(data, label) for data, _, label in source.samples()] == [
        ((folder / "cat/a.png").read_bytes(), 3),
        ((folder / "cat/b.JPG").read_bytes(), 0),
    ]


def test_s3_input_and_output(folder, s3):
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.put(str(folder), f"{s3.bucket}/tree", recursive=True)
    source = image_folder_samples(s3.url("tree"), short_side=20, storage_options=s3.storage_options)
    assert source.classes == ["cat", "dog"]
    out = s3.url("image-shards")
    prepare_image_shards(source, out, 3, s3.storage_options)
    index, samples = read_samples(out, s3.storage_options)
    assert index["total_samples"] == len(samples) == 5
    decoded = ImageDecoder(EvalTransform(16, 20), 10)(samples[0][1], samples[0][0], 0)
    assert decoded["images"].shape == (3, 16, 16) and decoded["labels"].item() == 0


def test_writer_refuses_bad_samples(tmp_path):
    def source(samples: list, classes: list[str]) -> ImageSource:
        return ImageSource(classes, samples, Encoded, "made here", "made here")

    with pytest.raises(UserError, match="label 2, outside 0..1"):
        prepare_image_shards(source([(b"x", "png", 2)], ["a", "b"]), str(tmp_path / "a"), 10)
    with pytest.raises(UserError, match="'bmp'"):
        prepare_image_shards(source([(b"x", "bmp", 0)], ["a"]), str(tmp_path / "b"), 10)
    with pytest.raises(UserError, match="no images"):
        prepare_image_shards(source([], ["a"]), str(tmp_path / "c"), 10)
    with pytest.raises(UserError, match="class list is empty"):
        prepare_image_shards(source([(b"x", "png", 0)], []), str(tmp_path / "d"), 10)


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*"))}


def test_interrupted_preparation_resumes_without_reading_finished_images(folder, tmp_path):
    """A file that fails mid-run (here: still being copied, so the same size but not yet an
    image) stops the run after the shards before it; once it is whole, the re-run writes only
    the rest, never reading the finished shards' images again, and the shards equal a clean run's."""
    fresh = prepare_image_shards(image_folder_samples(str(folder)), str(tmp_path / "clean"), 2)
    assert (fresh.written, fresh.skipped) == (3, 0)
    late, good = folder / "dog/sub/c.jpeg", (folder / "dog/sub/c.jpeg").read_bytes()  # sample 3, shard 1
    late.write_bytes(b"\0" * len(good))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"dog/sub/c\.jpeg"):
        prepare_image_shards(image_folder_samples(str(folder)), str(out), 2)
    progress = json.loads((out / PROGRESS_NAME).read_text())
    assert [s["name"] for s in progress["shards"]] == ["shard-000000.tar"] and not (out / "index.json").exists()
    late.write_bytes(good)
    first = folder / "cat/a.png"  # in the finished shard: garbage now, so reading it again would fail
    first.write_bytes(b"\0" * first.stat().st_size)
    resumed = prepare_image_shards(image_folder_samples(str(folder)), str(out), 2)
    assert (resumed.written, resumed.skipped, resumed.already_done) == (2, 1, False)
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert resumed.index == fresh.index and not (out / PROGRESS_NAME).exists()
    again = prepare_image_shards(image_folder_samples(str(folder)), str(out), 2)
    assert again.already_done and again.written == 0 and again.index == fresh.index


def test_other_settings_on_an_output_need_overwrite(folder, tmp_path):
    prepare_image_shards(image_folder_samples(str(folder)), str(tmp_path), 2)
    (folder / "cat/extra.png").write_bytes(image_bytes((9, 9), "PNG"))  # another input file
    for source in (image_folder_samples(str(folder)), image_folder_samples(str(folder), short_side=20)):
        with pytest.raises(UserError, match="different preparation.*--overwrite"):
            prepare_image_shards(source, str(tmp_path), 2)
    result = prepare_image_shards(image_folder_samples(str(folder), short_side=20), str(tmp_path), 2, overwrite=True)
    assert result.index["total_samples"] == 6 and sorted(shard_bytes(tmp_path)) == [
        f"shard-00000{i}.tar" for i in range(3)
    ]


def test_bad_inputs_name_the_file(folder, tmp_path):
    (folder / "dog/broken.png").write_bytes(image_bytes((20, 20), "PNG")[:60])
    with pytest.raises(UserError, match=r"dog/broken\.png"):
        list(image_folder_samples(str(folder)).samples())
    with pytest.raises(UserError, match="does not exist"):
        image_folder_samples(str(tmp_path / "nowhere"))
    (tmp_path / "empty_class" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        image_folder_samples(str(tmp_path / "empty_class"))
    bad_row = tmp_path / "bad.csv"
    bad_row.write_text("path,label\nonly-a-path.png\n")
    with pytest.raises(UserError, match="line 2"):
        csv_samples(str(bad_row))


# --------------------------------------------------------------------------- augmentation


def halves(width: int, height: int) -> Image.Image:
    """Black left half, white right half."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, width // 2 :] = 255
    return Image.fromarray(pixels)


def test_train_transform_shape_and_normalisation():
    mean, std = (0.5, 0.25, 0.1), (0.2, 0.4, 0.5)
    image = Image.new("RGB", (50, 40), (51, 102, 204))
    out = TrainTransform(32, mean=mean, std=std)(image, torch.Generator().manual_seed(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    expected = [(v / 255 - m) / s for v, m, s in zip((51, 102, 204), mean, std, strict=True)]
    for c in range(3):
        assert torch.allclose(out[c], torch.full((32, 32), expected[c]), atol=1e-5)


def test_train_transform_is_a_function_of_the_generator():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    transform = TrainTransform(24)

    def run(seed):
        return transform(image, torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    # A fixed number of draws per call: what follows does not depend on the image's size.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    transform(image, g1)
    transform(Image.new("RGB", (5, 300)), g2)  # its random boxes fail: the fallback crop
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_train_crop_boxes_within_scale_and_ratio():
    transform = TrainTransform(16, scale=(0.25, 0.5), ratio=(0.5, 2.0))
    g = torch.Generator().manual_seed(0)
    boxes = {transform.crop_box(200, 100, torch.rand(transform.draws - 1, generator=g).tolist()) for _ in range(300)}
    for left, top, right, bottom in boxes:
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 100
        assert 0.24 <= w * h / 20000 <= 0.51 and 0.49 <= w / h <= 2.05


def test_train_flip_about_half_the_time():
    transform = TrainTransform(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), **UNIT)  # the whole image, resized
    g = torch.Generator().manual_seed(0)
    flips = sum(transform(halves(16, 16), g)[0, :, 0].mean().item() > 128 for _ in range(400))
    assert 160 < flips < 240  # mean 200, sd 10


def test_eval_transform_centre_crop():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = EvalTransform(20, resize=40, **UNIT)(Image.fromarray(pixels))  # no resize: a pure crop
    assert torch.allclose(out, torch.from_numpy(pixels[10:30, 20:40]).permute(2, 0, 1).float(), atol=1e-3)
    # 200x100 -> 100x50 -> centre 50x50 = source columns 50..150: black left half, white right half.
    out = EvalTransform(50, resize=50, **UNIT)(halves(200, 100))
    assert (out[:, :, :22] < 1).all() and (out[:, :, 28:] > 254).all()
    assert EvalTransform().resize == 256
    assert torch.equal(EvalTransform(32)(halves(70, 50)), EvalTransform(32)(halves(70, 50)))


# --------------------------------------------------------------------------- bad shard data


def test_decode_sample_and_bad_members(digits_dir):
    _, samples = read_samples(str(digits_dir))
    url, sample = samples[5]
    decoder = ImageDecoder(TrainTransform(16), 10)
    decoded = decoder(sample, url, 0)
    assert decoded["images"].shape == (3, 16, 16) and decoded["labels"].dtype == torch.int64
    assert decoded["labels"].shape == () and decoded["labels"].item() == 5
    key = sample["__key__"]
    cases = {
        "png": ({**sample, "png": b"\x89PNG not really"}, rf"{key}\.png in shard {url}"),
        "cls missing": ({k: v for k, v in sample.items() if k != "cls"}, rf"{key} in shard {url} has no \.cls"),
        "cls": ({**sample, "cls": b"five"}, rf"{key}\.cls in shard {url} is 'five'"),
        "cls range": ({**sample, "cls": b"10"}, rf"{key}\.cls in shard {url} is '10', not a class number 0\.\.9"),
        "image missing": (
            {k: v for k, v in sample.items() if k != "png"},
            rf"{key} in shard {url} has no \.jpg or \.png",
        ),
    }
    for bad, pattern in cases.values():
        with pytest.raises(UserError, match=pattern):
            decoder(bad, url, 0)


# --------------------------------------------------------------------------- CLI


def prepare_images(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, str(REPO / "tools/prepare_images.py"), "--no-progress", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_cli_digits_and_folder_to_s3(tmp_path, folder, s3, digits_dir):
    out = tmp_path / "digits"
    proc = prepare_images("--digits", "--output", str(out), "--samples-per-shard", "500", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    totals = f"{N_DIGITS} images, 10 classes"
    assert proc.stdout.strip() == f"wrote 4 shards (0 finished earlier, skipped), {totals} to {out}"
    assert shard_bytes(out) == shard_bytes(digits_dir)  # two encoding processes write what one does
    proc = prepare_images("--digits", "--output", str(out), "--samples-per-shard", "500")
    assert proc.stdout.strip() == f"{out} was already complete: 4 shards, {totals}; nothing to do"
    options = [f"--storage-option={k}={v}" for k, v in s3.storage_options.items()]
    out = s3.url("cli-images")
    proc = prepare_images("--image-folder", str(folder), "--output", out, "--short-side", "20", *options)
    assert proc.returncode == 0, proc.stderr
    index, samples = read_samples(out, s3.storage_options)
    assert index["total_samples"] == len(samples) == 5 and index["classes"] == ["cat", "dog"]


@pytest.mark.slow
def test_cli_bad_input_is_one_line(tmp_path, folder):
    (folder / "cat/broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    for args, culprit in [
        (["--image-folder", str(folder)], "cat/broken.jpg"),
        (["--csv", str(tmp_path / "missing.csv")], "missing.csv"),
    ]:
        proc = prepare_images(*args, "--output", str(tmp_path / "out"))
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("prepare_images: error:") and culprit in lines[0]
