"""The run folder as a hub repo: the card parses with huggingface_hub, carries the front matter the hub reads,
shows evaluation numbers and samples when they exist, and its code snippet runs as pasted. Nothing is uploaded."""

import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from lora_dpo import card, export, hub, models, publish
from lora_dpo.export import ADAPTER_FILE, detect_format, read_file, save_adapter
from lora_dpo.recipe import LoraRecipe, ModelRecipe, from_dict


def _run_folder(folder: Path, base: str, source: str) -> Path:
    """A finished run folder as training leaves it (adapter, recipe, metrics, card), without training."""
    recipe = from_dict({"model": {"base": base}, "data": {"source": source, "resolution": 64},
                        "lora": {"rank": 4, "alpha": 8.0}, "objective": {"beta": 2000.0},
                        "train": {"max_steps": 10}, "output": {"name": folder.name}})
    unet = models.load_base(ModelRecipe(base=base), with_encoders=False).unet
    config = models.add_lora(unet, LoraRecipe(rank=4, alpha=8.0))
    metrics = {"steps": 10, "seconds": 1.5, "loss": 0.61, "reward_accuracy": 0.75, "val_reward_accuracy": 0.625}
    save_adapter(folder, unet, config, recipe, metrics)
    return folder


@pytest.fixture(scope="module")
def run_dir(tiny_base_dir: Path, shapes_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run_folder(tmp_path_factory.mktemp("card") / "shapes-run", str(tiny_base_dir), str(shapes_jsonl))


def test_card_parses_with_huggingface_hub_and_has_the_front_matter(run_dir: Path, tiny_base_dir: Path) -> None:
    from huggingface_hub import ModelCard

    parsed = ModelCard.load(run_dir / "README.md")
    data = parsed.data.to_dict()
    assert {"lora", "diffusers", "text-to-image", "dpo"} <= set(data["tags"])
    assert data["library_name"] == "diffusers" and data["license"] == "other"  # unknown (local) base
    assert "base_model" not in data  # a local folder is not a hub id; the hub would reject it
    assert "beta 2000" in parsed.text and "rank 4, alpha 8" in parsed.text and "| val_reward_accuracy | 0.625 |" in \
        parsed.text
    assert card.hub_problems(run_dir) == []
    assert "<Gallery />" not in parsed.text  # no sample grids yet: no gallery to show


def test_card_snippet_runs_as_pasted(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = card.write_model_card(run_dir).read_text()  # the card as training wrote it (local adapter path)
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "card-snippet", "exec"), {})  # as pasted: 50 steps at the tiny base's 64 px
    assert Image.open(tmp_path / "fox.png").size == (64, 64)


def test_card_shows_evaluation_and_samples_when_present(run_dir: Path) -> None:
    grids = run_dir / "eval" / "grids"
    grids.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(grids / "grid-000.png")
    report = {"base": "tiny", "prompts": "parti", "n_prompts": 4, "seeds": [0, 1], "grids": ["grids/grid-000.png"],
              "summary": {"pickscore": {"1": {"rate": 0.625, "low": 0.5, "high": 0.75, "wins": 5, "ties": 0,
                                              "losses": 3}}}}
    (run_dir / "eval" / "report.json").write_text(json.dumps(report))
    text = card.model_card(run_dir)
    assert "| pickscore | 1 | **62.5%** (50.0% - 75.0%) | 5 / 0 / 3 |" in text
    flat = {"rate": 0.75, "low": 0.75, "high": 0.75, "wins": 9, "ties": 0, "losses": 3,
            "interval_note": "no interval: resampling the 3 prompts never moves the rate"}  # as `eval` writes it
    (run_dir / "eval" / "report.json").write_text(json.dumps({**report, "summary": {"shapes": {"1": flat}}}))
    assert ("| shapes | 1 | **75.0%** (no interval: resampling the 3 prompts never moves the rate) | 9 / 0 / 3 |"
            in card.model_card(run_dir))  # never "(75.0% - 75.0%)", which reads as certainty
    assert "![samples](eval/grids/grid-000.png)" in text
    assert "Evaluated:" not in text  # a report that does not say which file it scored names none
    own = hashlib.sha256((run_dir / ADAPTER_FILE).read_bytes()).hexdigest()
    for sha, evaluated in ((own, f"`{ADAPTER_FILE}`"), ("0" * 64, "a file no longer in this folder")):
        (run_dir / "eval" / "report.json").write_text(json.dumps({**report, "adapter_sha256": sha}))
        assert f"Evaluated: {evaluated}" in card.model_card(run_dir)  # by the hash, not by where the report lies
    report["summary"] = {"clip": {"mean": 0.31}}  # another shape: every number under its path
    (run_dir / "eval" / "report.json").write_text(json.dumps(report))
    assert "| clip.mean | 0.31 |" in card.model_card(run_dir)


def test_hub_base_gets_base_model_license_and_dataset(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    folder = tmp_path / "sdxl-run"
    folder.mkdir()
    recipe = from_dict({"output": {"name": "sdxl-run"}})  # defaults: SDXL base on Pick-a-Pic v2
    (folder / "recipe.toml").write_text(recipe.to_toml())
    card.write_model_card(folder, adapter_ref="me/sdxl-dpo")
    data = ModelCard.load(folder / "README.md").data
    assert data.base_model == "stabilityai/stable-diffusion-xl-base-1.0" and data.license == "openrail++"
    assert data.datasets == ["yuvalkirstain/pickapic_v2"] and "stable-diffusion-xl" in data.tags
    text = (folder / "README.md").read_text()
    assert "pipe.load_lora_weights('me/sdxl-dpo')" in text
    assert card.hub_problems(folder) == [f"no {ADAPTER_FILE}"]
    (folder / "recipe.toml").write_text(from_dict({"output": {"license": "mit"}}).to_toml())
    assert "license: mit" in card.model_card(folder)  # [output].license overrides the base's


def test_upload_leaves_out_checkpoints_and_offline_fails_at_once_in_one_line(run_dir: Path) -> None:
    (run_dir / "checkpoint-5").mkdir(exist_ok=True)
    (run_dir / "checkpoint-5" / "adapter.safetensors").write_bytes(b"x")
    files = card.hub_files(run_dir)
    assert ADAPTER_FILE in files and "README.md" in files and "recipe.toml" in files
    assert not any(f.startswith("checkpoint-") for f in files)
    with pytest.raises(hub.HubUnavailableError, match="me/run: the upload goes to the Hugging Face hub, which is "
                                                      "offline here"):  # HF_HUB_OFFLINE=1 in the tests
        publish.push(run_dir, "me/run")
    publish.prepare(run_dir, "me/run")  # what push does next, online
    assert "pipe.load_lora_weights('me/run')" in (run_dir / "README.md").read_text()  # refreshed for the hub
    with pytest.raises(models.ModelError, match="no recipe.toml"):
        card.model_card(run_dir / "checkpoint-5")


def test_hand_edited_card_is_kept(run_dir: Path, tmp_path: Path) -> None:
    edited = (run_dir / "README.md").read_text().replace(card.MARK + "\n", "") + "\nMy notes.\n"
    (run_dir / "README.md").write_text(edited)
    publish.prepare(run_dir, "me/run")
    assert (run_dir / "README.md").read_text() == edited


def test_push_prepares_the_kohya_file_and_a_gallery_of_uploaded_samples(run_dir: Path) -> None:
    """What `push` uploads, offline: the kohya file beside the diffusers one, the card naming which is for which
    tool, and a `widget:` gallery (parsed by huggingface_hub) of the newest sample grids, each one uploaded."""
    from huggingface_hub import ModelCard

    samples = run_dir / "samples"
    samples.mkdir(exist_ok=True)
    for name in ("base.png", "step-000005.png", "step-000010.png"):
        Image.new("RGB", (8, 8)).save(samples / name)
    (samples / card.SAMPLE_PROMPTS_FILE).write_text(json.dumps(["a red circle", "a blue square"]))
    card.write_model_card(run_dir)  # as training wrote it (an earlier test may have hand-edited it)
    kohya_path = publish.prepare(run_dir, "me/run")
    assert kohya_path.name == "shapes-run_kohya.safetensors" and kohya_path.parent == run_dir
    tensors, metadata = read_file(kohya_path)
    assert detect_format(tensors) == "kohya" and metadata["ss_network_dim"] == "4"
    uploaded = card.hub_files(run_dir)
    assert {ADAPTER_FILE, kohya_path.name} <= set(uploaded)
    parsed = ModelCard.load(run_dir / "README.md")
    gallery = parsed.data.widget
    assert [g["output"]["url"] for g in gallery] == ["samples/step-000010.png", "samples/step-000005.png"]
    assert all(g["text"] == "a red circle | a blue square" for g in gallery)
    assert all(g["output"]["url"] in uploaded for g in gallery)
    assert f"| `{ADAPTER_FILE}` |" in parsed.text and f"`{kohya_path.name}` (kohya format)" in parsed.text
    assert "pipe.load_lora_weights('me/run')" in parsed.text and card.hub_problems(run_dir) == []
    # the hub shows the widget images where the body says <Gallery />: under the title, as diffusers' cards do
    assert "\n# shapes-run\n\n<Gallery />\n\nA LoRA adapter" in parsed.text
    (run_dir / "README.md").write_text((run_dir / "README.md").read_text().replace("<Gallery />\n", ""))
    assert card.hub_problems(run_dir) == ["README.md lists widget images but its text has no <Gallery />: put it "
                                          "under the title"]
    card.write_model_card(run_dir)
    (samples / "step-000010.png").unlink()  # a gallery image that would not be uploaded is a problem
    assert card.hub_problems(run_dir) == ["README.md widget image samples/step-000010.png is not among the "
                                          "uploaded files"]


def test_the_adapter_sha256_is_the_files_own_in_training_metrics_card_and_eval(tiny_recipe, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    """One value, the sha256 of pytorch_lora_weights.safetensors's bytes: printed at the end of training, in
    metrics.json, in the model card, in `lora-dpo eval`'s report. The kohya file `push` writes has its own, and
    each file's hash is named with that file only."""
    from typer.testing import CliRunner

    from lora_dpo.cli import app
    from lora_dpo.train import train

    path = train(tiny_recipe(train={"max_steps": 2, "log_every": 1}, data={"val_pairs": 0}))
    run_dir = path.parent
    printed = re.findall(r"^lora-dpo: adapter sha256 ([0-9a-f]+) \(pytorch_lora_weights.safetensors\)$",
                         capsys.readouterr().out, re.M)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert printed == [sha]  # whole, once
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["adapter_file"], metrics["adapter_sha256"]) == (ADAPTER_FILE, sha)
    assert f"- `{ADAPTER_FILE}`: `{sha}`" in (run_dir / "README.md").read_text()

    (tmp_path / "prompts.txt").write_text("a red circle\n")
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--prompts", str(tmp_path / "prompts.txt"), "--scorer",
                                      "shapes", "--steps", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output[-2000:]
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["adapter_sha256"] == report["generation"]["adapter_sha256"] == sha
    assert report["adapter_file"] == str(path)
    assert f"sha256 `{sha}`" in (run_dir / "eval" / "report.md").read_text()

    kohya_path = publish.prepare(run_dir, "me/run")  # the kohya file, and the card refreshed with the eval
    kohya_sha = hashlib.sha256(kohya_path.read_bytes()).hexdigest()
    assert kohya_sha != sha
    text = (run_dir / "README.md").read_text()
    assert f"- `{ADAPTER_FILE}`: `{sha}`" in text and f"- `{kohya_path.name}`: `{kohya_sha}`" in text
    assert f"Evaluated: `{ADAPTER_FILE}`, sha256 `{sha}`." in text
    assert text.count(sha) == 2 and text.count(kohya_sha) == 1  # the list and the evaluation; the list
    # the headers: the kohya file does not carry the diffusers file's hash, nor a file converted back the kohya one's
    assert sha not in json.dumps(read_file(kohya_path)[1])
    back = export.export_adapter(kohya_path, tmp_path / "back.safetensors", "diffusers", "fp32")
    assert not [k for k in read_file(back)[1] if "hash" in k]
