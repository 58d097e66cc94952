"""The visual Concept Slider (`sdserve train slider --pairs DIR`, sdserve/trainers/slider_pairs.py) on
tiny-sd1, and the shapes world's pair writer (`sdserve train data shapes --pairs size`): the
objective against a hand-written oracle at step 0, weights that move, same seed same bytes,
exact resume, slider metadata, the file in sdserve and diffusers, and the bad-input refusals."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open

from sdserve.adapters.inspect import describe
from sdserve.cli.main import main
from sdserve.engine import Engine, EngineConfig
from sdserve.engine.request import AdapterSpec
from sdserve.models.builtin import builtin_path
from sdserve.models.shapes.scorer import read_image
from sdserve.models.shapes.world import IMAGE_SIZE, SIZE_RANGE, render, shape_mask
from sdserve.trainers.loop import LoopConfig, batch_indices, seeded_generator, train
from sdserve.trainers.shapes_folder import (
    PROVENANCE_FILE,
    ShapesFolderConfig,
    _pair,
    read_provenance,
    resized,
    write_shapes_folder,
)
from sdserve.trainers.slider_pairs import _STREAM_PAIRS, PairSliderConfig, PairSliderMethod, load_pairs
from tests.engine.oracle import max_pixel_difference
from tests.trainers.conftest import run_cli
from tests.trainers.test_diffusers_images import TOLERANCE, _diffusers, _moved, _sdserve

MODEL = "tiny-sd1"
CAPTION = "a photo of a dog"
# lr large enough that 4 steps move the image (the loss itself is tiny on a random tiny model).
FLAGS = ["--model", MODEL, "--lr", "0.05", "--batch-size", "2", "--no-progress"]


def write_pairs(root: Path, count: int = 3, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """`count` pairs of random RGB PNGs (width, height `size`); pair 0 captioned in before/, pair 1
    in after/, the others none (they take --target's caption)."""
    rng = np.random.default_rng(seed)
    for side in ("before", "after"):
        (root / side).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        for side in ("before", "after"):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / side / f"p{i}.png")
    (root / "before" / "p0.txt").write_text("a large dog\n")
    if count > 1:
        (root / "after" / "p1.txt").write_text("a large cat\n")
    return root


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs")


# -- the method ------------------------------------------------------------------------------


def test_captions_come_from_either_side_or_the_default(pairs_dir):
    pairs = load_pairs(pairs_dir, 32, default_caption=CAPTION)
    assert pairs.names == ("p0", "p1", "p2")
    assert pairs.captions == ("a large dog", "a large cat", CAPTION)
    assert pairs.before.shape == pairs.after.shape == (3, 3, 32, 32) and pairs.before.dtype == torch.uint8
    assert load_pairs(pairs_dir, 32).captions[2] == ""  # no caption, no --target: the empty prompt


def test_step_zero_objective_matches_its_oracle(components_of, pairs_dir):
    """At step 0 (B = 0) the LoRA at ±1 is the frozen model, so the loss is the mean of the frozen
    model's denoising losses on the after and the before latents with one shared noise and
    timestep per pair; the oracle is a second copy of the model without any LoRA."""
    components = components_of(MODEL)
    pairs = load_pairs(pairs_dir, components.resolution, default_caption=CAPTION)
    method = PairSliderMethod(components, PairSliderConfig(batch_size=2), pairs, seed=3)
    loss = method.step_loss(0, seeded_generator(5, 13, 0))

    oracle = components_of(MODEL)
    rows = batch_indices(3, _STREAM_PAIRS, 0, 2, len(pairs))
    generator = seeded_generator(5, 13, 0)  # the same draws, in step_loss's order
    timesteps = torch.randint(0, oracle.objective.num_timesteps, (2,), generator=generator)
    after, before = oracle.encode_images(pairs.after[rows]), oracle.encode_images(pairs.before[rows])
    noise = torch.randn(after.shape, generator=generator)
    losses = []
    with torch.no_grad():
        for latents in (after, before):
            noisy = oracle.objective.add_noise(latents, noise, timesteps)
            out = oracle.predict(noisy, timesteps, oracle.encode_text([pairs.captions[r] for r in rows]))
            target = oracle.objective.target(latents, noise, timesteps)
            losses.append((out - target).pow(2).mean())
    assert float((after - before).abs().max()) > 1e-3  # the two sides differ: the check below means something
    torch.testing.assert_close(loss.detach(), (losses[0] + losses[1]) / 2, rtol=1e-4, atol=1e-8)


def test_trained_scale_s_puts_after_at_plus_s_and_before_at_minus_s(components_of, pairs_dir):
    """With non-zero factors and --train-scale 2, the one-call loss equals the after images'
    loss with the LoRA at +2 plus the before images' at -2, each a call of its own."""
    components = components_of(MODEL)
    pairs = load_pairs(pairs_dir, components.resolution, default_caption=CAPTION)
    method = PairSliderMethod(components, PairSliderConfig(batch_size=2, scale=2.0), pairs, seed=3)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in method.lora.layers.values():
            layer.up.normal_(0, 0.5, generator=generator)
        loss = method.step_loss(0, seeded_generator(5, 13, 0))
        rows = batch_indices(3, _STREAM_PAIRS, 0, 2, len(pairs))
        draws = seeded_generator(5, 13, 0)
        timesteps = torch.randint(0, components.objective.num_timesteps, (2,), generator=draws)
        after, before = method.latents_after[rows], method.latents_before[rows]
        noise = torch.randn(after.shape, generator=draws)
        captions = [pairs.captions[r] for r in rows]
        losses = {}
        for name, latents, scale in (("after", after, 2.0), ("before", before, -2.0), ("swapped", after, -2.0)):
            method.set_scale(scale)
            out = method.predict(components.objective.add_noise(latents, noise, timesteps), timesteps, captions)
            losses[name] = (out - components.objective.target(latents, noise, timesteps)).pow(2).mean()
    assert abs(float(losses["swapped"] - losses["after"])) > 1e-4  # the sign matters: the check means something
    torch.testing.assert_close(loss, (losses["after"] + losses["before"]) / 2, rtol=1e-4, atol=1e-8)
    assert method.metadata()["sdserve_slider_scale_range"] == "-2,2"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pairs_dir) -> dict[str, Path]:
    """Visual slider files from the CLI: 4 steps straight, and 2 steps (kohya keys) resumed to 4."""
    work = tmp_path_factory.mktemp("visual")
    common = [*FLAGS, "--pairs", str(pairs_dir), "--target", CAPTION]
    runs = {
        "first": ["--steps", "4", "--out", str(work / "first.safetensors")],
        "kohya": ["--steps", "2", "--format", "kohya", "--out", str(work / "kohya.safetensors")],
        "resumed": ["--steps", "4", "--out", str(work / "resumed.safetensors"), "--resume", str(work / "kohya.state")],
    }
    outputs = {}
    for name, flags in runs.items():
        assert main(["train", "slider", *common, *flags]) == 0, name
        outputs[name] = Path(flags[flags.index("--out") + 1])
    return outputs


def test_same_seed_same_bytes_and_resume_is_exact(trained, components_of, pairs_dir, tmp_path):
    first = trained["first"].read_bytes()
    assert trained["resumed"].read_bytes() == first
    components = components_of(MODEL)
    pairs = load_pairs(pairs_dir, components.resolution, default_caption=CAPTION)
    method = PairSliderMethod(components, PairSliderConfig(batch_size=2), pairs, seed=0)
    result = train(method, components, None, LoopConfig(steps=4, lr=0.05, batch_size=2, progress=False),
                   tmp_path / "s.safetensors")
    assert len(result.losses) == 4 and all(0 < loss < float("inf") for loss in result.losses)
    assert result.out.read_bytes() == first


def test_weights_move_and_the_metadata_says_visual_slider(trained):
    with safe_open(str(trained["first"]), "pt") as handle:
        metadata = handle.metadata()
        ups = [handle.get_tensor(k) for k in handle.keys() if k.endswith("lora_B.weight")]  # noqa: SIM118
    assert ups and all(torch.isfinite(u).all() for u in ups)
    assert max(float(u.abs().max()) for u in ups) > 0  # B starts at zero: training moved it
    assert metadata["sdserve_slider"] == "true" and metadata["sdserve_method"] == "slider"
    assert metadata["sdserve_slider_objective"] == "visual" and metadata["sdserve_slider_pairs"] == "3"
    assert metadata["sdserve_slider_scale_range"] == "-1,1" and metadata["sdserve_slider_start"] == "0"
    assert "sdserve_slider_positive" not in metadata
    summary = describe(str(trained["kohya"]), "kohya.safetensors")
    assert summary.kind == "LoRA" and summary.slider == {"scale_range": "-1,1", "start": "0"}


def test_resume_with_other_pairs_is_refused(trained, tmp_path, capsys):
    other = write_pairs(tmp_path / "other", seed=1)
    code, out, err = run_cli(capsys, "train", "slider", *FLAGS, "--pairs", str(other), "--target", CAPTION,
                             "--steps", "4", "--out", str(tmp_path / "o.safetensors"),
                             "--resume", str(trained["kohya"].with_suffix(".state")))
    assert code == 2 and err.count("\n") == 1 and "--resume" in err and "pairs_sha256" in err, err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(device="cpu", dtype="float32"))


@pytest.mark.parametrize("layout", ["first", "kohya"])
def test_visual_slider_gives_the_same_image_in_sdserve_and_diffusers(trained, engine, layout):
    ours = _sdserve(engine, model=MODEL, prompt=CAPTION, adapters=(AdapterSpec(path=str(trained[layout])),))
    pipe = StableDiffusionPipeline.from_pretrained(builtin_path(MODEL))
    pipe.load_lora_weights(str(trained[layout]))
    assert max_pixel_difference(ours, _diffusers(pipe, CAPTION)) <= TOLERANCE
    assert _moved(engine, ours, CAPTION)


# -- bad input: one line, exit 2, nothing written --------------------------------------------


def _remove(path: Path) -> None:
    for file in sorted(path.iterdir()):
        file.unlink()
    path.rmdir()


@pytest.mark.parametrize("case, expected", [
    ("no after", "has no after/ folder"),
    ("lonely", "before/p2.png has no partner in after/"),
    ("lonely after", "after/extra.png has no partner in before/"),
    ("sizes", "pair 'p1'"),
    ("empty", "holds no pairs"),
    ("text flag", "--positive: a text-slider flag"),
    ("conflicting captions", "caption differs"),
])
def test_bad_pairs_are_one_line_exit_2(capsys, tmp_path, case, expected):
    root = write_pairs(tmp_path / "pairs")
    extra: list[str] = []
    if case == "no after":
        _remove(root / "after")
    elif case == "lonely":
        (root / "after" / "p2.png").unlink()
    elif case == "lonely after":
        Image.new("RGB", (40, 48)).save(root / "after" / "extra.png")
    elif case == "sizes":
        Image.new("RGB", (48, 48)).save(root / "after" / "p1.png")
    elif case == "empty":
        for side in ("before", "after"):
            _remove(root / side)
            (root / side).mkdir()
    elif case == "text flag":
        extra = ["--positive", "large"]
    elif case == "conflicting captions":
        (root / "after" / "p0.txt").write_text("a small dog\n")
    out = tmp_path / "s.safetensors"
    code, _, err = run_cli(capsys, "train", "slider", *FLAGS, "--pairs", str(root), "--out", str(out), *extra)
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not out.exists() and not out.with_suffix(".state").exists()


def test_text_slider_still_needs_its_flags(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "slider", "--model", MODEL, "--target", CAPTION,
                           "--out", str(tmp_path / "s.safetensors"))
    assert code == 2 and err.count("\n") == 1 and "--positive" in err and "--pairs" in err, err
    code, _, err = run_cli(capsys, "train", "slider", "--model", MODEL, "--positive", "large", "--negative", "small",
                           "--target", CAPTION, "--train-scale", "2", "--out", str(tmp_path / "s.safetensors"))
    assert code == 2 and err.count("\n") == 1 and "--train-scale: only with --pairs" in err, err


# -- the shapes world's pairs ----------------------------------------------------------------


def test_size_pairs_differ_in_size_alone(tmp_path):
    """`train data shapes --pairs size`: the scorer reads each pair back (ground truth) with the
    same colour, kind, position and background, small before and large after; the painted area
    (what the bench measures) is the shape mask's pixel count, and grows."""
    root = tmp_path / "pairs"
    assert main(["train", "data", "shapes", "--pairs", "size", "--count", "12", "--out", str(root),
                 "--exclude", "red,square,right", "--no-progress"]) == 0
    records = read_provenance(root)["images"]
    assert len(records) == 12
    for record in records:
        name = Path(record["file_name"]).stem
        caption = (root / "before" / f"{name}.txt").read_text().strip()
        assert caption == record["text"] and "small" not in caption and "large" not in caption
        assert not (root / "after" / f"{name}.txt").exists()
        before, after = (read_image(np.asarray(Image.open(root / side / f"{name}.png"))) for side in ("before", "after"))
        (b,), (a,) = before.shapes, after.shapes
        assert (b.color, b.kind, b.position) == (a.color, a.kind, a.position)
        assert (b.color, b.kind, b.position) != ("red", "square", "right")
        assert before.background == after.background == record["scene"]["background"]
        assert (b.size, a.size) == ("small", "large")
        drawn, after_extent = record["scene"]["shapes"][0]["extent"], record["after"]["shapes"][0]["extent"]
        assert SIZE_RANGE["small"][0] - 3 <= drawn <= SIZE_RANGE["small"][1] - 3 and after_extent == 3 * drawn
        assert a.position == record["scene"]["shapes"][0]["position"]
        scene_before, scene_after = _pair(ShapesFolderConfig(out=root, count=12, exclude=frozenset(
            {("red", "square", "right")}), pairs="size"), int(name))
        assert resized(scene_before, lambda extent: 3 * extent) == scene_after
        assert b.area == int(shape_mask(scene_before.shapes[0]).sum()) < a.area == int(
            shape_mask(scene_after.shapes[0]).sum())
        assert np.array_equal(np.asarray(Image.open(root / "after" / f"{name}.png")), render(scene_after))
    # The folder loads as pairs, and the same seed writes the same bytes.
    assert len(load_pairs(root, IMAGE_SIZE)) == 12
    again = write_shapes_folder(ShapesFolderConfig(out=tmp_path / "again", count=12, pairs="size", progress=False,
                                                   exclude=frozenset({("red", "square", "right")})))
    for side in ("before", "after"):
        for file in sorted((root / side).iterdir()):
            assert (again / side / file.name).read_bytes() == file.read_bytes()


def test_background_pairs_differ_in_background_alone(capsys, tmp_path):
    """`--pairs background`: the same scene on black before and on white after, read back by the
    scorer (ground truth); the shape is neither black nor white, and captions name no background."""
    root = write_shapes_folder(ShapesFolderConfig(out=tmp_path / "bg", count=10, seed=2, pairs="background",
                                                  progress=False))
    records = read_provenance(root)["images"]
    assert len(records) == 10
    sizes = set()
    for record in records:
        name = Path(record["file_name"]).stem
        caption = (root / "before" / f"{name}.txt").read_text().strip()
        assert caption == record["text"] and "background" not in caption
        before, after = (read_image(np.asarray(Image.open(root / side / f"{name}.png"))) for side in ("before", "after"))
        (b,), (a,) = before.shapes, after.shapes
        assert (b.color, b.kind, b.position, b.size) == (a.color, a.kind, a.position, a.size)
        assert b.color not in ("black", "white") and b.area == a.area
        assert (before.background, after.background) == ("black", "white")
        assert record["after"]["shapes"] == record["scene"]["shapes"]
        sizes.add(b.size)
    assert sizes == {"small", "large"}  # both of the world's sizes, unlike size pairs
    code, _, err = run_cli(capsys, "train", "data", "shapes", "--pairs", "background", "--colors", "black,white",
                           "--count", "2", "--out", str(tmp_path / "none"))
    assert code == 2 and err.count("\n") == 1 and "--colors" in err and not (tmp_path / "none").exists()


def test_omit_size_drops_the_size_word_and_nothing_else(capsys, tmp_path):
    """`--omit-size` (the brightness slider that is composed with a size slider): the same pairs,
    pixel for pixel, with captions that name no size; plain folders take it too."""
    args = ("train", "data", "shapes", "--pairs", "background", "--count", "6", "--seed", "2", "--no-progress")
    assert run_cli(capsys, *args, "--out", str(tmp_path / "sized"))[0] == 0
    assert run_cli(capsys, *args, "--omit-size", "--out", str(tmp_path / "unsized"))[0] == 0
    for name in sorted(p.stem for p in (tmp_path / "sized" / "before").glob("*.png")):
        for side in ("before", "after"):
            assert (tmp_path / "sized" / side / f"{name}.png").read_bytes() == \
                (tmp_path / "unsized" / side / f"{name}.png").read_bytes()
        sized = (tmp_path / "sized" / "before" / f"{name}.txt").read_text()
        unsized = (tmp_path / "unsized" / "before" / f"{name}.txt").read_text()
        assert re.sub(r"^a (small|large) ", "a ", sized) == unsized and sized != unsized
    plain = write_shapes_folder(ShapesFolderConfig(out=tmp_path / "plain", count=4, seed=2, omit_size=True,
                                                   progress=False))
    captions = [record["text"] for record in read_provenance(plain)["images"]]
    assert not any(word in caption.split() for caption in captions for word in ("small", "large")), captions


# A 6-image folder of the default config (seed 3), hashed with the shapes_folder.py of e6a5a32, before
# the pair writer existed (sha256 over the sorted file names and their decoded pixels or caption
# bytes, provenance file excluded; pixels, not PNG bytes, so a zlib update cannot fail it).
PLAIN_FOLDER_SHA256 = "6a291e2f3cc41d4ff441ff9c8981053d6321333e4f446296242042c77a9182d5"


def test_plain_folders_are_unchanged(tmp_path):
    out = write_shapes_folder(ShapesFolderConfig(out=tmp_path / "plain", count=6, seed=3, progress=False))
    hasher = hashlib.sha256()
    for file in sorted(out.iterdir()):
        if file.name != PROVENANCE_FILE:
            data = np.asarray(Image.open(file)).tobytes() if file.suffix == ".png" else file.read_bytes()
            hasher.update(file.name.encode() + data)
    assert hasher.hexdigest() == PLAIN_FOLDER_SHA256


def test_bad_pair_writer_flags_are_one_line_exit_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "data", "shapes", "--pairs", "size", "--count", "2",
                           "--shapes-per-image", "2", "--out", str(tmp_path / "p"))
    assert code == 2 and err.count("\n") == 1 and "--shapes-per-image" in err, err
    assert not (tmp_path / "p").exists()
