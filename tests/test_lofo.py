"""Leave one family out (python -m trainer tune --leave-one-out): the runs it trains and the table it reads off."""
from __future__ import annotations

import json

import pytest

from trainer import heldout, lofo
from trainer.config import make_config
from trainer.tune import tune_config


def metrics_with(heldout_acc: dict, per_family: dict, clean=0.9) -> dict:
    """metrics.json as a run writes it, with every held-out corruption at `heldout_acc[name]` (default 0.5)."""
    per_corruption = {name: {s: heldout_acc.get(name, 0.5) for s in ("1", "3", "5")} for name in heldout.HELD_OUT}
    return {"test": {"accuracy": clean}, "epochs": 2,
            "heldout": {"corrupted": {"accuracy": 0.6}, "per_corruption": per_corruption},
            "robustness": {"corrupted": {"accuracy": 0.7}, "per_family": per_family}}


def test_table_reads_each_family_off_its_own_corruptions():
    blur = {"motion_blur": 0.9, "defocus_blur": 0.8, "astigmatic_blur": 0.7, "field_blur": 0.6}
    full = metrics_with(blur, {"blur": [0.9, 0.8, 0.8, 0.7, 0.7, 0.5]})
    dropped = metrics_with({name: acc - 0.2 for name, acc in blur.items()}, {"blur": [0.9, 0.6, 0.6, 0.5, 0.5, 0.3]})
    trained = {"blur": ["--blur"]}
    rows = lofo.summarise({lofo.FULL: full, "drop-blur": dropped}, ["blur", "microscopy", "noise"], trained)
    blur_row, microscopy, noise = rows
    assert blur_row["heldout_full"] == pytest.approx(0.75) and blur_row["heldout_dropped"] == pytest.approx(0.55)
    assert blur_row["drop"] == pytest.approx(0.2)
    assert blur_row["clean_full"] == 0.9 and blur_row["drop_vs_clean"] == pytest.approx(0.2)  # same clean
    assert blur_row["in_distribution_full"] == pytest.approx(0.7)  # severities 1-5, not the clean entry
    assert blur_row["in_distribution_dropped"] == pytest.approx(0.5)
    assert blur_row["heldout_corruptions"] == list(heldout.FAMILIES["blur"])
    # Nothing trains on microscopy: its dropped run is the full run; the suite has no microscopy corruptions.
    assert microscopy["dropped_run"] == lofo.FULL and microscopy["drop"] == 0
    assert microscopy["in_distribution_full"] is None
    assert noise["dropped_run"] == lofo.FULL  # trained by nothing in this base either
    text = lofo.markdown(rows, [lofo.run_row(lofo.FULL, full, 1.5)])
    assert "| blur | 0.7500 | 0.5500 | +0.2000 | +0.2000 | 0.7000 / 0.5000 | --blur |" in text
    assert "| microscopy | 0.5000 | = full (nothing trains on it) |" in text
    # A dropped run that is 0.1 better clean: its family figure gained 0.1 from that, not from the drop.
    dropped["robustness"]["per_family"]["blur"][0] = 1.0
    assert lofo.summarise({lofo.FULL: full, "drop-blur": dropped}, ["blur"], trained)[0]["drop_vs_clean"] == \
        pytest.approx(0.3)


def test_family_ops_of_the_cpu_profile_follow_the_declaration():
    found = lofo.family_ops(make_config("cpu"))
    assert set(found) == set(heldout.FAMILIES) - {"microscopy"}
    assert "--noise-std" in found["noise"] and "--noise-std" not in found["colour"]
    assert "--black-fill" in found["geometry"] and "corruption stage zoom" in found["geometry"]
    assert found["compression"] == ["corruption stage pixelate", "corruption stage jpeg"]
    assert set(found["occlusion"]) == {"--erase", "corruption stage grid_mask", "corruption stage patches"}


def test_leave_one_out_trains_full_then_each_trained_family_and_writes_the_table(data_path, tmp_path, capsys):
    """Smoke scale: blur (the smoke profile trains no blur) and microscopy take the full run; noise gets its own."""
    base = tune_config("smoke", data=data_path, runs_dir=str(tmp_path), name="lofo", limit=320, epochs=1,
                       robustness_images=16, verbose=0)
    rows = lofo.leave_one_out(base, budget_min=30, families=["noise", "blur", "microscopy"])
    folder = tmp_path / "lofo"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["drop-noise", "full"]
    assert json.load(open(folder / "drop-noise" / "config.json"))["drop_family"] == "noise"
    assert json.load(open(folder / "full" / "config.json"))["drop_family"] == ""
    saved = json.load(open(folder / "lofo.json"))
    assert saved["families"] == json.loads(json.dumps(rows)) and [r["run"] for r in saved["runs"]] == ["full",
                                                                                                      "drop-noise"]
    noise, blur, microscopy = rows
    assert noise["dropped_run"] == "drop-noise" and 0 <= noise["heldout_dropped"] <= 1
    assert noise["drop"] == pytest.approx(noise["heldout_full"] - noise["heldout_dropped"])
    assert blur["dropped_run"] == microscopy["dropped_run"] == "full" and blur["drop"] == 0
    assert (folder / "lofo.md").read_text().strip() in capsys.readouterr().out
    # The full run scored itself on every family, the dropped one only on noise, each on the same test images.
    assert set(json.load(open(folder / "drop-noise" / "lofo_scores.json"))["heldout"]["per_corruption"]) == set(
        heldout.FAMILIES["noise"])
    assert json.load(open(folder / "full" / "metrics.json"))["heldout"]["per_corruption_images"] == 16

    # The same command again goes on where it stopped: here nothing is left, so nothing trains.
    assert lofo.leave_one_out(base, budget_min=30, families=["noise", "blur", "microscopy"]) == rows
    out = capsys.readouterr().out
    assert out.count("reusing the finished run") == 2
    assert [r["minutes"] for r in json.load(open(folder / "lofo.json"))["runs"]] == [r["minutes"] for r in
                                                                                    saved["runs"]]
    assert "phase train" not in out


def test_cli_refuses_mixed_or_unknown_choices(capsys):
    from trainer.__main__ import main
    assert main(["tune", "--profile", "smoke", "--leave-one-out", "--candidates", "none"]) == 2
    assert "leave out --candidates" in capsys.readouterr().err
    assert main(["tune", "--profile", "smoke", "--leave-one-out", "--families", "noise,stain"]) == 2
    assert "unknown family ['stain'] in --families; choose from noise,blur" in capsys.readouterr().err
    assert main(["tune", "--profile", "smoke", "--families", "noise"]) == 2
    assert "--families goes with --leave-one-out" in capsys.readouterr().err
