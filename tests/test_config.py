import dataclasses

import pytest

from snapens.config import AUTO_MAX_SNAPSHOTS, PRESETS, TrainConfig, auto_snapshots, resolve_config


def test_defaults_are_valid_and_round_trip():
    cfg = TrainConfig()
    assert TrainConfig(**cfg.to_dict()) == cfg


def test_preset_then_overrides():
    cfg = resolve_config("paper-densenet-40-12-cifar100", lr=0.1, seed=None)
    assert (cfg.model, cfg.dataset, cfg.epochs, cfg.snapshots, cfg.batch_size) == (
        "densenet-40-12", "cifar100", 300, 6, 64)
    assert cfg.lr == 0.1 and cfg.seed == TrainConfig().seed  # None means "not given"


def test_paper_presets_follow_the_paper():
    for name, values in PRESETS.items():
        cfg = resolve_config(name)
        assert cfg.momentum == 0.9 and cfg.nesterov and cfg.weight_decay == 1e-4, name
        if cfg.dataset == "svhn":
            assert (cfg.epochs, cfg.snapshots, cfg.val_size, cfg.augment) == (40, 5, 6000, False)
    assert resolve_config("paper-resnet-110-cifar10").epochs == 200
    assert resolve_config("paper-densenet-100-24-cifar100").snapshots == 6


@pytest.mark.parametrize("bad,match", [
    (dict(snapshots=0), "snapshots"), (dict(epochs=3, snapshots=4), "exceed"), (dict(lr=-0.1), "lr"),
    (dict(batch_size=0), "batch"), (dict(schedule="linear"), "linear"), (dict(precision="int8"), "int8"),
    (dict(lr=0.1, lr_min=0.2), "lr_min"), (dict(momentum=float("nan")), "nan"), (dict(weight_decay=-1.0), "-1.0"),
    (dict(lr=float("inf")), "inf"), (dict(val_size=-5), "-5"),
    (dict(limit_train=0), "limit_train must be a positive image count, got 0"),
    (dict(limit_test=True), "limit_test must be a positive image count, got True"),
])
def test_bad_values_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(None, **bad)


@pytest.mark.parametrize("bad,match", [
    (dict(schedule="fge", fge_start=1.2), "fge_start must be a fraction of the budget in \\(0, 1\\), got 1.2"),
    (dict(schedule="swa", swa_start=0.0), "swa_start .* got 0.0"),
    (dict(cycle_mult=0.5), "cycle_mult must be >= 1 .* got 0.5"),
    (dict(cycle_decay=1.5), "cycle_decay must be in \\(0, 1\\], got 1.5"),
    (dict(schedule="fge", cycle_epochs=0), "cycle_epochs must be a positive integer, got 0"),
    (dict(schedule="swa", swa_lr=-0.01), "swa_lr must be > 0 and finite, got -0.01"),
    (dict(schedule="fge", lr_min=0.01), "lr_min=0.01 applies to the cosine schedules, not to fge"),
    # an option of another schedule is refused rather than silently ignored
    (dict(fge_start=0.3), "fge_start=0.3 applies to the fge schedule, not to cosine-cycles"),
    (dict(schedule="step", cycle_decay=0.5), "cycle_decay=0.5 applies to the cosine-cycles and single-cycle"),
    (dict(schedule="fge", swa_lr=0.05), "swa_lr=0.05 applies to the swa schedule, not to fge"),
])
def test_bad_schedule_options_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(None, **bad)


def test_schedule_option_defaults_and_m_free_schedules():
    cfg = TrainConfig()
    assert (cfg.cycle_decay, cfg.cycle_mult, cfg.fge_start, cfg.cycle_epochs, cfg.fge_lr1, cfg.fge_lr2,
            cfg.swa_start, cfg.swa_lr) == (1.0, 1.0, 0.5, 2, 0.5, 0.005, 0.75, None)
    # fge and swa take as many snapshots as the budget holds: M > epochs is not an error there
    assert resolve_config(None, schedule="fge", epochs=4).snapshots == 5
    with pytest.raises(ValueError, match="exceed"):
        resolve_config(None, schedule="cosine-cycles", epochs=4)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="nope"):
        resolve_config("nope")
    with pytest.raises(ValueError, match="colour"):
        resolve_config(None, colour="red")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().epochs = 3  # type: ignore[misc]


def test_limits_default_to_every_image_and_are_recorded():
    assert (TrainConfig().limit_train, TrainConfig().limit_test) == (None, None)
    cfg = resolve_config(limit_train=5000, limit_test=1000)
    assert cfg.to_dict()["limit_train"] == 5000 and cfg.to_dict()["limit_test"] == 1000


@pytest.mark.parametrize("dataset,epochs,m", [
    ("digits", 12, 2), ("digits", 17, 2), ("digits", 18, 3), ("digits", 5, 1), ("digits", 1, 1),  # 1 at least
    ("digits", 36, 6), ("digits", 300, 6),  # at most AUTO_MAX_SNAPSHOTS
    ("cifar10", 40, 2), ("cifar100", 16, 1), ("cifar10", 200, 6), ("svhn", 48, 3), ("cifar10-jpeg", 32, 2),
    ("CIFAR10", 7, 1), ("folder:/data/imgs", 64, 4), ("Folder:rel/path", 31, 1),
])
def test_auto_snapshots_is_epochs_over_the_shortest_cycle_clamped(dataset, epochs, m):
    assert AUTO_MAX_SNAPSHOTS == 6
    assert auto_snapshots(dataset, epochs) == m


def test_auto_snapshots_refuses_a_dataset_without_a_rule():
    with pytest.raises(ValueError, match="no rule for dataset 'mnist'.*give --snapshots M"):
        auto_snapshots("mnist", 40)


def test_snapshots_auto_resolves_after_the_preset_and_explicit_m_is_kept():
    cfg = resolve_config(None, snapshots="auto", epochs=12)
    assert (cfg.snapshots, cfg.snapshots_auto) == (2, True)
    assert TrainConfig(**cfg.to_dict()) == cfg and cfg.to_dict()["snapshots_auto"] is True
    # the preset's dataset and epochs decide: SVHN, 40 epochs // 16
    cfg = resolve_config("paper-wrn-32-4-svhn", snapshots="auto")
    assert (cfg.snapshots, cfg.snapshots_auto) == (2, True)
    cfg = resolve_config("paper-densenet-40-12-cifar10", snapshots="auto", epochs=48)
    assert (cfg.snapshots, cfg.snapshots_auto) == (3, True)
    # auto is opt-in: presets keep their M, explicit M is never overridden
    assert (resolve_config("paper-densenet-40-12-cifar10").snapshots, TrainConfig().snapshots_auto) == (6, False)
    cfg = resolve_config(None, snapshots=3, epochs=12)
    assert (cfg.snapshots, cfg.snapshots_auto) == (3, False)
    # a recorded auto run keeps its stored M whatever the table says today
    assert TrainConfig(epochs=12, snapshots=4, snapshots_auto=True).snapshots == 4


@pytest.mark.parametrize("schedule", ["fge", "swa"])
def test_snapshots_auto_is_refused_for_fge_and_swa(schedule):
    with pytest.raises(ValueError, match=f"snapshots auto applies to .*the {schedule} schedule"):
        resolve_config(None, schedule=schedule, snapshots="auto")
    with pytest.raises(ValueError, match=f"the {schedule} schedule"):
        TrainConfig(schedule=schedule, snapshots_auto=True)
