"""The held-out corruptions: each behaves like a suite corruption, and nothing in training can reach one."""
from __future__ import annotations

import ast
import dataclasses
import functools
import os
from dataclasses import fields

import numpy as np
import pytest
from PIL import Image

from trainer import corrupt, heldout, heldout_eval
from trainer.config import PROFILES, Config, make_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = [name for name in heldout.HELD_OUT if heldout.CORRUPTIONS[name].__module__ == "trainer.heldout"]


@pytest.fixture(scope="module")
def few(real_slice):
    return real_slice[0][:16]


# ---- each held-out corruption ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", heldout.HELD_OUT)
def test_every_severity_keeps_shape_dtype_and_input(few, name):
    before = few.copy()
    for severity in range(6):
        out = heldout.apply(few, name, severity, np.random.default_rng(0))
        assert out.shape == few.shape and out.dtype == np.uint8 and out is not few
    np.testing.assert_array_equal(few, before)
    np.testing.assert_array_equal(heldout.apply(few, name, 0, np.random.default_rng(0)), few)


@pytest.mark.parametrize("name", heldout.HELD_OUT)
def test_seeded_and_heavier_severity_changes_more(few, name):
    first = heldout.apply(few, name, 3, np.random.default_rng(7))
    np.testing.assert_array_equal(first, heldout.apply(few, name, 3, np.random.default_rng(7)))
    change = [np.abs(heldout.apply(few, name, s, np.random.default_rng(1)).astype(np.float64) - few).mean()
              for s in (1, 3, 5)]
    assert 0 < change[0] < change[1] < change[2], change


@pytest.mark.parametrize("name", heldout.HELD_OUT)
def test_severity_one_changes_every_image(few, name):
    """Even the mildest level alters each image, so a held-out score never counts untouched copies."""
    out = heldout.apply(few, name, 1, np.random.default_rng(2))
    assert all(not np.array_equal(a, b) for a, b in zip(out, few))


def test_works_on_non_square_and_small_images(few):
    for strip in (few[:3, :64, :80], few[:2, :9, :13]):
        for name in heldout.HELD_OUT:
            out = heldout.apply(strip, name, 5, np.random.default_rng(0))
            assert out.shape == strip.shape and out.dtype == np.uint8, name


def test_apply_rejects_names_outside_the_held_out_registry(few):
    with pytest.raises(ValueError, match="unknown corruption 'gaussian_noise'"):
        heldout.apply(few, "gaussian_noise", 1, np.random.default_rng(0))  # seen in training: not held out


# ---- the declared split ---------------------------------------------------------------------------------

def test_every_family_has_held_out_corruptions_and_a_new_one():
    assert set(heldout.FAMILIES) == {"noise", "blur", "colour", "geometry", "compression", "occlusion",
                                     "microscopy"}
    for family, names in heldout.FAMILIES.items():
        assert any(name in NEW for name in names), f"{family} has no corruption of our own"
    assert len(set(heldout.HELD_OUT)) == len(heldout.HELD_OUT) == len(heldout.REGISTRY)


def test_every_suite_corruption_is_declared_seen_or_held_out_never_both():
    suite = set(corrupt.CORRUPTIONS)
    held_from_suite = {name for name in heldout.HELD_OUT if name in suite}
    assert held_from_suite == {"shot_noise", "motion_blur", "defocus_blur"}
    assert set(heldout.SEEN_IN_TRAINING) | held_from_suite == suite
    assert not set(heldout.SEEN_IN_TRAINING) & set(heldout.HELD_OUT)
    for name in held_from_suite:  # the same function, so a held-out score and the suite's table agree
        assert heldout.CORRUPTIONS[name] is corrupt.CORRUPTIONS[name]
    declared = {kind for kinds, _ in heldout.TRAINING_OPS.values() for kind in kinds}
    assert declared <= suite and not declared & set(heldout.HELD_OUT)


def every_flag_on() -> Config:
    """Every augmentation at the top of its range (booleans on): the most training can ever see."""
    values = {}
    for f in fields(Config):
        meta = f.metadata
        if meta["off"] is not None:  # drop_family has none: it takes augmentation away
            if isinstance(f.default, bool):
                values[f.name] = True
            elif meta.get("choices"):  # a kind of augmentation: the last one that is not off
                values[f.name] = [c for c in meta["choices"] if c != meta["off"]][-1]
            else:
                values[f.name] = meta["high"]
    return make_config("gpu", **values)


CONFIGS = {**{name: make_config(name) for name in PROFILES}, "every flag on": every_flag_on()}


def op_function(op):
    return op.func if isinstance(op, functools.partial) else op


@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_ops_are_declared_and_none_is_held_out(config):
    from trainer import augment
    cfg = CONFIGS[config]
    ops = [op_function(op) for op in augment.corruption_ops(cfg)]
    held = set(heldout.CORRUPTIONS.values())
    for op in ops:
        assert op.__name__ in heldout.TRAINING_OPS, f"{op.__name__} trains but is not declared in TRAINING_OPS"
        assert op not in held and op.__code__ not in {f.__code__ for f in held}, f"{op.__name__} is held out"
        assert op.__name__.lstrip("_") not in heldout.HELD_OUT, f"{op.__name__} is named like a held-out corruption"
    if config == "every flag on":  # the declaration lists no op that training lacks
        stages = {"geometry", "make_randaugment", "colour", "blur", "erase", "randconv", "augmix", "pixmix", "apr",
                  "patch_gaussian", "veil", "mix"}
        assert {op.__name__ for op in ops} | stages == set(heldout.TRAINING_OPS)


# ---- leave one family out: --drop-family -----------------------------------------------------------------

OFF = {f.name: f.metadata["off"] for f in fields(Config)}


def op_families(name: str) -> set:
    """The families a training op produces, from the declaration (not from augment.py's own tables)."""
    return heldout.families_of(heldout.TRAINING_OPS[name][0])


def test_stage_flags_split_the_declared_stages_without_losing_a_flag_or_a_corruption():
    listed = set()
    for stage in ("geometry", "colour", "blur", "erase", "randconv", "augmix", "apr", "patch_gaussian", "veil"):
        kinds, flags = heldout.TRAINING_OPS[stage]
        names = [flag[2:].replace("-", "_") for flag in flags.split()]
        listed |= set(names)
        assert set(kinds) == {kind for name in names for kind in heldout.STAGE_FLAGS[name]}, stage
    assert listed == set(heldout.STAGE_FLAGS)
    layers = {kind for kinds in heldout.RANDAUGMENT_LAYERS.values() for kind in kinds}
    assert layers == set(heldout.TRAINING_OPS["make_randaugment"][0])


@pytest.mark.parametrize("family", list(heldout.FAMILIES))
def test_drop_family_leaves_no_training_op_of_that_family_and_every_other(family):
    """Every augmentation at the top of its range, then --drop-family: no corruption-stage op, stage setting or
    RandAugment transform that the declaration puts in the family is left, and all the others are."""
    from trainer import augment
    full = every_flag_on()
    dropped = dataclasses.replace(full, drop_family=family)
    validate(dropped)
    every = [op_function(op).__name__ for op in augment.corruption_ops(full)]
    kept = [op_function(op).__name__ for op in augment.corruption_ops(dropped)]
    assert kept == [name for name in every if family not in op_families(name)]
    runs_with = augment.without_dropped_family(dropped)
    for name, kinds in heldout.STAGE_FLAGS.items():
        assert getattr(full, name) != OFF[name], name
        expected = OFF[name] if family in heldout.families_of(kinds) else getattr(full, name)
        assert getattr(runs_with, name) == expected, name
    others = {k: v for k, v in runs_with.to_dict().items() if k not in heldout.STAGE_FLAGS}
    assert others == {k: v for k, v in dropped.to_dict().items() if k not in heldout.STAGE_FLAGS}
    names = [type(layer).__name__ for layer in augment.make_randaugment(full).layers]
    left = [type(layer).__name__ for layer in augment.make_randaugment(dropped).layers]
    assert left == [n for n in names if family not in heldout.families_of(heldout.RANDAUGMENT_LAYERS[n])]
    # Every family but microscopy, which no training op produces, loses something.
    assert (kept != every or runs_with != dropped or left != names) == (family != "microscopy")


@pytest.mark.parametrize("family", ["geometry", "colour", "noise", "blur", "occlusion"])
def test_pipeline_with_only_a_dropped_familys_stages_on_leaves_images_as_they_are(family, few):
    """The family's stage settings at the top of their range and nothing else: augment_batch changes every batch,
    and with --drop-family it returns the images untouched."""
    import tensorflow as tf

    from trainer import augment
    on = {name: getattr(every_flag_on(), name) for name, kinds in heldout.STAGE_FLAGS.items()
          if family in heldout.families_of(kinds)}
    cfg = make_config("cpu", **{**{k: v for k, v in OFF.items() if v is not None}, **on})
    images = tf.constant(few, tf.float32)
    tf.random.set_seed(0)
    assert not np.array_equal(augment.augment_batch(images, cfg).numpy(), few)
    untouched = augment.augment_batch(images, dataclasses.replace(cfg, drop_family=family)).numpy()
    np.testing.assert_array_equal(untouched, few)


def test_corruption_stage_skips_a_dropped_familys_ops_and_draws_the_others_as_often(monkeypatch, real_slice):
    """A dropped op keeps its slot in the draw: each other op corrupts the same images as without the drop."""
    import tensorflow as tf

    from trainer import augment
    picked = {}

    def recording(name):
        def op(x, strength):
            picked[name] = picked.get(name, 0) + int(x.shape[0])
            return x
        op.__name__ = name
        return op
    monkeypatch.setattr(augment, "CORRUPTION_OPS", tuple(recording(op.__name__) for op in augment.CORRUPTION_OPS))
    cfg = make_config("cpu", corrupt=1.0, corrupt_ops=3, corrupt_jpeg=False, corrupt_zoom=0.0, corrupt_blur=0.0)
    images = tf.constant(real_slice[0][:256], tf.float32)
    counts = {}
    for drop in ("", "noise"):
        picked.clear()
        tf.random.set_seed(3)
        augment.corrupt_and_damage(images, dataclasses.replace(cfg, drop_family=drop))
        counts[drop] = dict(picked)
    assert set(counts[""]) - set(counts["noise"]) == {"_gaussian_noise", "_salt_pepper"}
    assert counts["noise"] == {k: v for k, v in counts[""].items() if k in counts["noise"]}
    assert sum(counts[""].values()) > 256  # 1-3 ops an image: the counts are of real picks


def test_drop_family_takes_only_a_family_name():
    for value in ("", *heldout.FAMILIES):
        validate(make_config("cpu", drop_family=value))
    with pytest.raises(ValueError, match="--drop-family is 'colours'; choose one of noise, blur, colour"):
        validate(make_config("cpu", drop_family="colours"))
    assert set(heldout.FAMILIES) == set(corrupt.FAMILIES) | {"microscopy"}  # both suites' families


# ---- what training code can reach, read from the source -------------------------------------------------

def module_path(module: str) -> str:
    return os.path.join(ROOT, *module.split(".")) + ".py"


@functools.lru_cache(maxsize=None)
def top_level(module: str) -> dict:
    """{name: [its bindings]} at the top of a module: AST nodes, or (module, name) for a name imported from another
    project module; a name bound twice (X = X + (op,)) keeps both."""
    tree = ast.parse(open(module_path(module)).read())
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found.setdefault(node.name, []).append(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        found.setdefault(name.id, []).append(node)
        elif isinstance(node, ast.ImportFrom):
            for name, binding in imported(module, node).items():
                found.setdefault(name, []).append(binding)
    return found


def imported(module: str, node: ast.ImportFrom) -> dict:
    """Project names a `from ... import` binds: (module, name) for a name, (module, None) for a module."""
    base = node.module or ""
    if node.level:
        base = "trainer" + (f".{base}" if base else "")
    if not base.startswith("trainer"):
        return {}
    out = {}
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out[alias.asname or alias.name] = (sub, None) if os.path.exists(module_path(sub)) else (base, alias.name)
    return out


def reach(*starts: tuple) -> set:
    """Every project definition (module, name) that the starts use, following names, module attributes and
    imports, at the top of a module or inside a function."""
    seen, todo = set(), list(starts)
    while todo:
        module, name = todo.pop()
        if (module, name) in seen:
            continue
        seen.add((module, name))
        local = {}
        for binding in top_level(module).get(name, []):
            if isinstance(binding, tuple):
                todo.append(binding)
                continue
            for node in ast.walk(binding):
                if isinstance(node, ast.ImportFrom):
                    local.update(imported(module, node))
            for node in ast.walk(binding):
                if isinstance(node, ast.Name) and node.id in local:
                    todo.append(local[node.id])
                elif isinstance(node, ast.Name) and node.id in top_level(module):
                    todo.append((module, node.id))
                elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                    bound = local.get(node.value.id) or next(
                        (b for b in top_level(module).get(node.value.id, []) if isinstance(b, tuple)), None)
                    if bound is not None and bound[1] is None:  # module.attribute
                        todo.append((bound[0], node.attr))
    # Keep definitions only: names that are imports or modules are the way there, not code.
    return {(module, name) for module, name in seen
            if name is not None and any(not isinstance(b, tuple) for b in top_level(module).get(name, []))}


TRAINING = reach(("trainer.train", "fit"), ("trainer.augment", "train_dataset"),
                 ("trainer.augment", "augmented_samples"))


def held_out_implementations() -> set:
    found = set()
    for function in heldout.CORRUPTIONS.values():
        found |= reach((function.__module__, function.__name__))
    return found


def test_the_reach_follows_imports_partials_and_module_attributes():
    """The check below can only fail if it sees through the ways code gets at other code."""
    assert ("trainer.corrupt", "HUE_SIN") in TRAINING  # imported by name into augment.py
    assert {("trainer.augment", "_jpeg"), ("trainer.augment", "_zoom"), ("trainer.augment", "_blur")} <= TRAINING
    assert ("trainer.data", "oversample") in TRAINING  # data.oversample, as a module attribute in fit
    assert ("trainer.augment", "train_dataset") in TRAINING  # imported inside fit
    mix = reach(("trainer.heldout", "corrupt_mix"))
    assert ("trainer.corrupt", "shot_noise") in mix and ("trainer.heldout", "banding") in mix
    assert ("trainer.corrupt", "_line_kernel") in held_out_implementations()


def test_training_never_reaches_a_held_out_implementation():
    """Held-out corruptions, their helpers and their parameter tables feed no training code, in any setting:
    the reach from fit and the pipeline covers every branch, so every flag at once."""
    shared = TRAINING & held_out_implementations()
    assert not shared, f"training code reaches held-out implementations: {sorted(shared)}"
    assert not any(module == "trainer.heldout" for module, _ in TRAINING)


# ---- the held-out mix -----------------------------------------------------------------------------------

def test_mix_is_seeded_uses_only_held_out_corruptions_in_registry_order(real_slice):
    images = real_slice[0][:48]
    before = images.copy()
    out, recipes = heldout.corrupt_mix(images, seed=3)
    again, recipes_again = heldout.corrupt_mix(images, seed=3)
    np.testing.assert_array_equal(out, again)
    assert recipes == recipes_again and not np.array_equal(out, heldout.corrupt_mix(images, seed=4)[0])
    np.testing.assert_array_equal(images, before)
    order = {name: i for i, name in enumerate(heldout.HELD_OUT)}
    for recipe in recipes:
        names = [name for name, _ in recipe]
        assert 1 <= len(recipe) <= 3 and len(set(names)) == len(names)
        assert all(name in heldout.CORRUPTIONS and 1 <= s <= 5 for name, s in recipe)
        assert names == sorted(names, key=order.get)
    assert sum(not np.array_equal(a, b) for a, b in zip(out, images)) == len(images)


# ---- scoring --------------------------------------------------------------------------------------------

def test_score_reads_every_figure_off_corrupted_copies(real_slice):
    """A predictor that knows every clean image by heart and answers class 0 otherwise: any figure taken off a
    clean image would show above the share of class 0."""
    images, labels = real_slice[0][:40], real_slice[1][:40]
    known = {image.tobytes(): label for image, label in zip(images, labels)}

    def memoriser(batch):
        return np.array([known.get(image.tobytes(), 0) for image in batch])
    assert (memoriser(images) == labels).all()
    base = float((labels == 0).mean())
    result = heldout_eval.score(memoriser, images, labels, seed=3, max_images=len(images), severities=(1, 5))
    assert result["corrupted"]["accuracy"] == pytest.approx(base) and result["corrupted"]["n"] == len(images)
    assert list(result["per_corruption"]) == list(heldout.HELD_OUT) and result["per_corruption_images"] == 40
    for name, row in result["per_corruption"].items():
        assert row == {"1": pytest.approx(base), "5": pytest.approx(base)}, name
    errors = result["errors_by_corruption"]
    _, recipes = heldout.corrupt_mix(images, seed=3)
    assert sum(r["images"] for r in errors.values()) == sum(len(recipe) for recipe in recipes)
    assert sum(r["wrong"] for r in errors.values()) == sum(len(recipe) for recipe, y in zip(recipes, labels) if y)
    again = heldout_eval.score(memoriser, images, labels, seed=3, max_images=10, severities=(3,))
    assert again["per_corruption_images"] == 10 and list(again["per_corruption"]["grain"]) == ["3"]


# ---- command line and preview ---------------------------------------------------------------------------

def test_preview_draws_every_corruption_on_one_cell(tmp_path, few, capsys):
    rows = heldout.preview_rows(few[0])
    assert [name for name, _, _ in rows] == list(heldout.HELD_OUT)
    for name, family, images in rows:
        assert family == heldout.FAMILY_OF[name] and len(images) == 3
        change = [np.abs(image.astype(np.float64) - few[0]).mean() for image in images]
        assert 0 < change[0] < change[2], name
    source = tmp_path / "cells.npz"
    np.savez(source, images=few)
    from trainer.__main__ import main
    assert main(["corrupt", "--heldout", "--preview", str(tmp_path / "p.png"), "--data", str(source),
                 "--cell", "2"]) == 0
    width, height = Image.open(tmp_path / "p.png").size
    assert width > 800 and height > 1000
    assert "18 held-out corruptions" in capsys.readouterr().out


def test_cli_writes_a_held_out_copy(tmp_path, few, capsys):
    labels = np.arange(len(few), dtype=np.uint8).reshape(-1, 1)
    source, target = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(source, images=few, labels=labels)
    from trainer.__main__ import main
    assert main(["corrupt", "--heldout", str(source), str(target), "--seed", "5"]) == 0
    with np.load(target) as data:
        np.testing.assert_array_equal(data["labels"], labels)
        np.testing.assert_array_equal(data["images"], heldout.corrupt_mix(few, seed=5)[0])
    assert "held-out corrupted images" in capsys.readouterr().out
    for argv, message in (([], "give IN.npz OUT.npz"), (["--preview", "x.png", "--data", str(source), "--cell",
                                                          "99"], "outside")):
        with pytest.raises(SystemExit) as exit_info:
            heldout.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
