"""``cornstarch prepare --config ...``: a LLaVA-format JSON with a corrupt image → encoded tar shards with a progress
bar and a report listing the corrupt image; ``cornstarch fit`` then trains on the shards, and refuses them under
another image processor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cornstarch.lit.cli import main
from tests.data.llava_data import write_llava

EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "digits_vlm.yaml"
ROWS = 24


def write_config(tmp_path: Path) -> tuple[Path, str]:
    """The default experiment's model, trained on a LLaVA set of 24 rows (row 5's image corrupt) for 2 steps."""
    path = write_llava(str(tmp_path), ROWS, images_per_row=1)
    corrupt = tmp_path / json.load(open(path))[5]["image"]
    corrupt.write_bytes(b"\x89PNG cut short")
    model = yaml.safe_load(EXPERIMENT.read_text())["model"]
    model.pop("generation")
    config = {
        "seed_everything": 0,
        "model": model,
        "data": {"train": {"path": "json", "data_files": path, "format": "llava", "image_root": str(tmp_path)},
                 "batch_size": 4},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 0, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "run"), "save_last": True}}]},
    }
    (tmp_path / "llava.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "llava.yaml", str(corrupt)


def test_prepare_writes_encoded_shards_reports_corrupt_images_and_fit_trains_on_them(tmp_path, capsys):
    config, corrupt = write_config(tmp_path)
    shards = tmp_path / "shards"
    main(["prepare", "--config", str(config), "--output_dir", str(shards), "--samples_per_shard", "10"])
    out, err = capsys.readouterr()
    assert f"{ROWS - 1} of {ROWS} rows written (encoded) to 3 shards" in out
    assert "Writing shards" in err, "a progress bar"
    report = json.loads((shards / "report.json").read_text())
    assert report["corrupt_images"] == [str(Path(corrupt).resolve())]
    assert [s["row"] for s in report["skipped"]] == [5] and "corrupt image" in report["skipped"][0]["reason"]
    assert json.loads((shards / "index.json").read_text())["encoding"]["placeholder"] == "<image>"

    main(["fit", "--config", str(config), "--data.train.path", "shards", "--data.train.data_dir", str(shards)])
    state = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    assert state["MultimodalDataModule"]["train_position"] == {"epoch": 0, "batch": 2, "epoch_length": (ROWS - 1) // 4}
    with pytest.raises(ValueError, match="another processor than this run's \\(differs: vision processor\\)"):
        main(["fit", "--config", str(config), "--data.train.path", "shards", "--data.train.data_dir", str(shards),
              "--model.encoders.vision.processor.kwargs", '{"size": {"shortest_edge": 8}, "do_normalize": false}'])


def test_prepare_refuses_a_split_it_cannot_convert(tmp_path):
    config, _ = write_config(tmp_path)
    with pytest.raises(ValueError, match="prepare converts a split read from one JSON file through a format"):
        main(["prepare", "--config", str(config), "--output_dir", str(tmp_path / "s"), "--data.train.format", "null"])


def test_prepare_with_encode_false_writes_raw_shards(tmp_path):
    config, _ = write_config(tmp_path)
    main(["prepare", "--config", str(config), "--output_dir", str(tmp_path / "raw"), "--encode", "false"])
    index = json.loads((tmp_path / "raw" / "index.json").read_text())
    assert index["encoding"] is None and index["samples"] == ROWS - 1
