import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from cxr import batches, device, schedule, stage, training
from cxr.augment import AugmentParams
from cxr.augment import augment as augment_batch
from cxr.batches import DeviceData, StreamedData
from cxr.classifier import Classifier
from cxr.device import autocast_dtype, grad_scaler
from cxr.images import load_square
from cxr.model import ModelCard, create_model, save_model
from cxr.params import ParamsError, load_params
from cxr.schedule import Schedule, first_trainable_group, layer_groups, set_trainable
from cxr.training import (
    Numerics,
    Params,
    Run,
    create_run,
    fit,
    new_progress,
    train_groups_of_epoch,
    train_one_epoch,
)
from tests.conftest import REPO

SIZE = 32


CPU = Numerics(torch.device("cpu"), None, torch.contiguous_format, mean=0.2, std=0.2)
LOSS = torch.nn.BCEWithLogitsLoss()


def replace(params: Params, **changes) -> Params:
    """A copy with some settings changed; `train=dict(...)` changes keys inside train."""
    nested = {
        k: getattr(params, k).model_copy(update=v)
        for k, v in changes.items()
        if isinstance(v, dict)
    }
    return params.model_copy(update={**changes, **nested})


@pytest.fixture
def params() -> Params:
    return replace(load_params(Params, REPO / "params.yaml"), batch_size=16, lr=2e-3, epochs=4)


def _squares(n: int, seed: int) -> DeviceData:
    """Dark images; positives carry a bright square somewhere: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images = rng.integers(20, 60, (n, SIZE, SIZE)).astype(np.uint8)
    labels = (np.arange(n) % 2).astype(np.int64)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(2, SIZE - 10, 2)
        images[i, y : y + 8, x : x + 8] = 220
    return DeviceData.from_arrays(images, labels, torch.device("cpu"))


def _run(params: Params, seed: int = 0) -> Run:
    torch.manual_seed(seed)
    return create_run(
        create_model("resnet10t", "none"), params, CPU, steps_per_epoch=4, compile=False
    )


def _epoch(run: Run, data: DeviceData, params: Params, epoch: int = 1) -> float:
    train_groups_of_epoch(run.model, epoch, params.train)
    return train_one_epoch(run, data, params, CPU, LOSS, epoch)[0]


def test_a_few_epochs_lower_the_loss(params: Params):
    run = _run(params)
    data = _squares(64, seed=0)
    losses = [_epoch(run, data, params, epoch) for epoch in range(1, 5)]
    assert losses[-1] < 0.7 * losses[0]


def test_training_is_deterministic_on_cpu(params: Params):
    states = []
    for _ in range(2):
        run = _run(params)
        _epoch(run, _squares(32, seed=1), params)
        states.append(run.model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_no_weight_decay_on_norm_weights_and_biases(params: Params):
    run = _run(replace(params, train={"weight_decay": 0.05}))
    decay = {id(p): g["weight_decay"] for g in run.optimizer.param_groups for p in g["params"]}
    for name, parameter in run.model.named_parameters():
        assert decay[id(parameter)] == (0.05 if parameter.ndim > 1 else 0.0), name
    assert sum(p.ndim == 1 for p in run.model.parameters()) > 10  # biases and norm weights


def test_mixed_precision_is_what_was_asked_for_or_an_error():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16  # CPU autocast runs bf16 kernels
    with pytest.raises(ParamsError, match=r"train\.precision: fp16 needs a CUDA device, not cpu"):
        autocast_dtype("fp16", cpu)
    with pytest.raises(ParamsError, match=r"train\.precision: bf16 is not supported on this mps"):
        autocast_dtype("bf16", torch.device("mps"))
    assert isinstance(grad_scaler(torch.float16, cpu), torch.amp.GradScaler)  # fp16 only
    assert grad_scaler(torch.bfloat16, cpu) is None
    assert grad_scaler(None, cpu) is None


def test_weight_averaging_validates_and_keeps_the_running_average(
    params: Params, monkeypatch: pytest.MonkeyPatch
):
    decay = 0.8
    params = replace(params, train={"ema_decay": decay})
    run = _run(params)
    data = _squares(16, seed=2)  # one batch: one optimizer step per epoch
    snapshots = []
    for epoch in (1, 2):
        _epoch(run, data, params, epoch)
        snapshots.append({k: v.clone() for k, v in run.model.state_dict().items()})
    averaged = run.kept_model.state_dict()
    for key, value in averaged.items():
        if value.is_floating_point():
            expected = decay * snapshots[0][key] + (1 - decay) * snapshots[1][key]
            torch.testing.assert_close(value, expected, msg=key)
    assert not torch.equal(averaged["fc.weight"], snapshots[1]["fc.weight"])

    aucs = iter([0.6, 0.7, 0.8, 0.9])  # every epoch is the best so far: the last one is kept
    monkeypatch.setattr(training, "validate", lambda *args: (0.5, next(aucs)))
    progress = fit(run, data, data, params, CPU, LOSS, new_progress(), lambda progress: None)
    assert progress["best_epoch"] == 4
    kept, last = progress["best_state"], run.model.state_dict()
    for key, value in run.kept_model.state_dict().items():
        assert torch.equal(kept[key], value), key
    assert not torch.equal(kept["fc.weight"], last["fc.weight"])


def test_frozen_backbone_trains_only_the_head(params: Params):
    params = replace(params, train={"freeze_epochs": 1})
    run = _run(params)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    _epoch(run, _squares(32, seed=2), params, epoch=1)
    after = {k: v.clone() for k, v in run.model.state_dict().items()}
    head = {f"fc.{name}" for name, _ in run.model.get_classifier().named_parameters()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == head  # BatchNorm statistics stay frozen too
    _epoch(run, _squares(32, seed=2), params, epoch=2)
    assert all(p.requires_grad for p in run.model.parameters())
    assert not torch.equal(after["conv1.0.weight"], run.model.state_dict()["conv1.0.weight"])


def test_progressive_unfreezing_adds_one_block_per_epoch_from_the_top(
    tmp_path: Path, params: Params
):
    weights = tmp_path / "imagenet_like.safetensors"  # 3 channels, 1000 classes, as on the hub
    save_file(timm.create_model("resnet10t", pretrained=False).state_dict(), str(weights))
    params = replace(params, epochs=6, train={"freeze_epochs": 1, "unfreeze": "progressive"})
    model = create_model("resnet10t", str(weights))
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    run = create_run(model, params, CPU, steps_per_epoch=2, compile=False)
    groups = layer_groups(run.model)  # resnet10t: stem, layer1..layer4, head
    assert [len(g) for g in groups] == [9, 6, 9, 9, 9, 2]
    assert groups[-1] == ["fc.weight", "fc.bias"] and groups[1][0].startswith("layer1.")
    data, changed_by_epoch = _squares(32, seed=2), []
    for epoch in range(1, 7):
        before = {k: v.clone() for k, v in run.model.state_dict().items()}
        _epoch(run, data, params, epoch=epoch)
        after = run.model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        changed_by_epoch.append({k.split(".")[0] for k in changed})
        frozen = set(before) - changed - {k for k in after if k.startswith("fc.")}
        assert all(torch.equal(after[k], loaded[k]) for k in frozen)  # still the file's weights
    assert changed_by_epoch == [
        {"fc"},
        {"fc", "layer4"},
        {"fc", "layer4", "layer3"},
        {"fc", "layer4", "layer3", "layer2"},
        {"fc", "layer4", "layer3", "layer2", "layer1"},
        {"fc", "layer4", "layer3", "layer2", "layer1", "conv1", "bn1"},
    ]
    assert [first_trainable_group(e, 1, "all", 6) for e in (1, 2, 3)] == [5, 0, 0]
    assert [first_trainable_group(e, 0, "progressive", 6) for e in (1, 5, 9)] == [4, 0, 0]


def test_frozen_groups_keep_batchnorm_statistics_in_eval_mode(params: Params):
    run = _run(params)
    groups = layer_groups(run.model)
    set_trainable(run.model, groups, len(groups) - 2)
    assert not run.model.layer3[0].bn1.training and run.model.layer4[0].bn1.training
    assert [p.requires_grad for p in run.model.parameters()].count(True) == 11


def _lrs(scheduler: Schedule, steps: int) -> list[list[float]]:
    """Each group's learning rate at each step."""
    optimizer, lrs = scheduler.optimizer, []
    for _ in range(steps):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_rises_linearly_then_cosine_decays_to_min_lr():
    weights = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weights], lr=1.0)
    scheduler = Schedule(optimizer, warmup_steps=4, total_steps=12, min_lr=0.01)
    lrs = [lr for (lr,) in _lrs(scheduler, 12)]
    np.testing.assert_allclose(lrs[:5], [0.25, 0.5, 0.75, 1.0, 1.0])  # no step at rate 0
    assert all(a > b for a, b in itertools.pairwise(lrs[4:]))
    np.testing.assert_allclose(lrs[-1], 0.01 + 0.99 * (1 + np.cos(np.pi * 7 / 8)) / 2)
    np.testing.assert_allclose(optimizer.param_groups[0]["lr"], 0.01)  # annealed to min_lr


def test_a_schedule_resumed_from_its_state_continues_exactly():
    """The checkpoint holds the schedule's state: a resumed run steps on at the same rates."""

    def fresh() -> Schedule:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
        return Schedule(optimizer, 3, 20, 1e-6, frozen_steps=4, head_lr=1e-2)

    straight = _lrs(fresh(), 20)
    first = fresh()
    before = _lrs(first, 9)
    resumed = fresh()
    resumed.load_state_dict(first.state_dict())
    np.testing.assert_allclose(before + _lrs(resumed, 11), straight, rtol=1e-12)


def test_the_frozen_phase_trains_the_head_at_head_lr_and_the_schedule_starts_after_it():
    """A frozen epoch must not spend warm-up and decay: the head learns at a steady head_lr,
    then the backbone thaws into warm-up and cosine, at its own scaled rate."""
    model = create_model("resnet10t", "none")
    groups = schedule.parameter_groups(model, lr=1e-3, weight_decay=0.05, backbone_lr_scale=0.1)
    assert [g["head"] for g in groups] == [True, True, False, False]  # the head's group first
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = Schedule(
        optimizer, warmup_steps=2, total_steps=10, min_lr=1e-5, frozen_steps=4, head_lr=5e-3
    )
    lrs = np.array(_lrs(scheduler, 10))
    head, backbone = lrs[:, 0], lrs[:, 2]
    np.testing.assert_allclose(head[:4], 5e-3)  # constant: no warm-up, no decay while frozen
    np.testing.assert_allclose(backbone[:4], 5e-5)  # moot while frozen: the rate it thaws into
    np.testing.assert_allclose(head[4:7], [5e-4, 1e-3, 1e-3])  # warm-up from the thaw
    np.testing.assert_allclose(backbone[4:7], 0.1 * head[4:7])  # the backbone at its scale
    assert all(a > b for a, b in itertools.pairwise(head[6:]))
    assert all(a > b for a, b in itertools.pairwise(backbone[6:]))
    np.testing.assert_allclose(optimizer.param_groups[0]["lr"], 1e-5)  # annealed to min_lr


def test_head_lr_zero_means_lr_and_the_epoch_logs_the_heads_rate(params: Params):
    params = replace(params, epochs=3, train={"freeze_epochs": 1, "head_lr": 0.0})
    run = _run(params)
    assert run.optimizer.param_groups[0]["lr"] == params.lr
    lrs = []
    for epoch in (1, 2):
        lrs.append(run.optimizer.param_groups[0]["lr"])
        _epoch(run, _squares(32, seed=3), params, epoch)
    assert lrs[0] == params.lr  # the whole frozen epoch at lr
    assert run.optimizer.param_groups[0]["lr"] < params.lr  # decaying after the warm-up


def test_augmentation_keeps_shape_and_range_and_can_be_switched_off():
    x = torch.rand(8, 1, SIZE, SIZE)
    generator = torch.Generator().manual_seed(0)
    settings = dict(rotation_deg=10, zoom=0.1, translate=0.05, hflip=True, brightness=0.1)
    out = augment_batch(x, AugmentParams(**settings, contrast=0.1), generator)
    assert out.shape == x.shape
    assert (out - x).abs().mean() > 0.05
    off = dict.fromkeys(settings, 0) | {"hflip": False}
    identity = augment_batch(x, AugmentParams(**off, contrast=0.0), generator)
    torch.testing.assert_close(identity, x, atol=1e-5, rtol=0)
    mirrored = augment_batch(x, AugmentParams(**off | {"hflip": True}, contrast=0.0), generator)
    flipped = [torch.allclose(m, i.flip(-1), atol=1e-5) for m, i in zip(mirrored, x, strict=True)]
    unchanged = [torch.allclose(m, i, atol=1e-5) for m, i in zip(mirrored, x, strict=True)]
    assert all(f or u for f, u in zip(flipped, unchanged, strict=True))
    assert 0 < sum(flipped) < len(x)  # about half of the batch is mirrored


def test_saved_model_reloads_and_predicts_identically(tmp_path: Path, params: Params):
    run = _run(params)
    _epoch(run, _squares(32, seed=3), params)
    card = ModelCard(arch="resnet10t", image_size=SIZE, resize="pad", mean=0.2, std=0.2)
    save_model(tmp_path / "model.pt", run.model, card)
    loaded = Classifier.load(tmp_path / "model.pt")
    images = _squares(8, seed=4).images.numpy()
    run.model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(run.model(loaded.to_tensor(images))).squeeze(1).numpy()
    np.testing.assert_array_equal(loaded.predict_proba(images), expected)
    assert loaded.card == card
    assert loaded.threshold == 0.5  # until the evaluate stage stores one beside it
    (tmp_path / "threshold.json").write_text('{"threshold": 0.3}')
    assert Classifier.load(tmp_path / "model.pt").threshold == 0.3


def test_a_model_prepares_new_images_the_way_its_training_images_were(
    tmp_path: Path, params: Params
):
    image = tmp_path / "dim.png"
    Image.fromarray(np.tile(np.arange(20, 60, dtype=np.uint8), (40, 1)), "L").save(image)
    for intensity in ("raw", "equalize"):
        card = ModelCard("resnet10t", SIZE, "pad", mean=0.2, std=0.2, intensity=intensity)
        save_model(tmp_path / "model.pt", _run(params).model, card)
        loaded = Classifier.load(tmp_path / "model.pt")
        assert loaded.card.intensity == intensity
        expected = load_square(image, SIZE, "pad", intensity)
        np.testing.assert_array_equal(loaded.load_image(image), expected)
    assert loaded.load_image(image).max() == 255  # equalized; the raw file tops out at 59


def test_flip_tta_averages_an_image_and_its_mirror(tmp_path: Path, params: Params):
    run = _run(params)
    _epoch(run, _squares(32, seed=3), params)
    card = ModelCard(arch="resnet10t", image_size=SIZE, resize="pad", mean=0.2, std=0.2)
    save_model(tmp_path / "model.pt", run.model, card)
    (tmp_path / "threshold.json").write_text('{"threshold": 0.4, "flip_tta": true}')
    classifier = Classifier.load(tmp_path / "model.pt")
    assert classifier.flip_tta and classifier.threshold == 0.4
    images = _squares(8, seed=4).images.numpy()
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    with torch.no_grad():
        logits = (
            classifier.model(classifier.to_tensor(images))
            + classifier.model(classifier.to_tensor(mirrored))
        ) / 2
    np.testing.assert_allclose(
        classifier.predict_proba(images), torch.sigmoid(logits).squeeze(1).numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(
        classifier.predict_proba(images), classifier.predict_proba(mirrored), rtol=1e-5
    )
    classifier.flip_tta = False
    assert not np.allclose(classifier.predict_proba(images), classifier.predict_proba(mirrored))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_load_through_timm_pretrained_path(tmp_path: Path, suffix: str):
    torch.manual_seed(0)
    imagenet_like = timm.create_model("resnet10t", pretrained=False)  # 3 channels, 1000 classes
    weights = tmp_path / f"weights{suffix}"
    state = imagenet_like.state_dict()
    if suffix == ".pth":
        torch.save(state, weights)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, weights)
    model = create_model("resnet10t", str(weights))
    stem = "conv1.0.weight"
    # timm sums the RGB filters into one grayscale filter and drops the 1000-class head.
    torch.testing.assert_close(model.state_dict()[stem], state[stem].sum(dim=1, keepdim=True))
    assert model.get_classifier().out_features == 1


def test_missing_or_incompatible_weights_name_the_file(tmp_path: Path):
    with pytest.raises(ParamsError, match=r"model\.pretrained: weights file .*nowhere\.pth"):
        create_model("resnet10t", str(tmp_path / "nowhere.pth"))
    other = tmp_path / "densenet.pth"
    torch.save(timm.create_model("densenet121", pretrained=False).state_dict(), other)
    with pytest.raises(ValueError, match=r"densenet\.pth does not fit resnet10t"):
        create_model("resnet10t", str(other))
    partial = tmp_path / "partial.pth"
    state = timm.create_model("resnet10t", pretrained=False).state_dict()
    del state["layer1.0.conv1.weight"]
    torch.save(state, partial)
    with pytest.raises(ValueError, match=r"partial.pth does not fit .*layer1.0.conv1.weight"):
        create_model("resnet10t", str(partial))
    with pytest.raises(ValueError, match="unknown timm architecture"):
        create_model("no_such_net", "none")


def test_fit_stops_early_and_keeps_the_best_epoch(params: Params, monkeypatch: pytest.MonkeyPatch):
    params = replace(params, epochs=6, train={"patience": 1})
    run = _run(params)
    aucs = iter([0.6, 0.9, 0.8, 0.95, 0.7, 0.7])
    monkeypatch.setattr(training, "validate", lambda *args: (0.5, next(aucs)))
    epochs = []
    progress = fit(
        run, _squares(32, 5), _squares(16, 6), params, CPU, LOSS, new_progress(),
        lambda progress: epochs.append(progress["history"][-1]["epoch"]),
    )  # fmt: skip
    assert epochs == [1, 2, 3]
    assert (progress["best_epoch"], progress["best_score"]) == (2, 0.9)
    assert progress["best_state"]["fc.weight"].shape == (1, 512)


def test_streamed_batches_train_exactly_as_batches_held_on_the_device(params: Params):
    held = _squares(40, seed=3)  # 3 batches of 16: the last one is short
    streamed = StreamedData(held.images.numpy(), held.labels)
    losses = {}
    for name, data in (("held", held), ("streamed", streamed)):
        run = _run(params)
        progress = fit(run, data, data, params, CPU, LOSS, new_progress(), lambda _: None)
        losses[name] = [(h["train_loss"], h["val_loss"]) for h in progress["history"]]
    assert len(losses["held"]) == params.epochs
    assert losses["streamed"] == losses["held"]


def test_streamed_batches_come_in_order_from_the_array():
    images = np.arange(10 * 2 * 2, dtype=np.uint8).reshape(10, 2, 2)
    data = StreamedData(images, torch.arange(10).float())
    order = [torch.tensor([7, 1, 3]), torch.tensor([0]), torch.tensor([9, 8])]
    batches = list(data.batches(order))
    assert len(batches) == 3
    for index, (x, y) in zip(order, batches, strict=True):
        assert torch.equal(x, torch.from_numpy(images[index.numpy()]))
        assert torch.equal(y, index.float())


def test_a_batch_too_small_to_share_joins_the_one_before():
    labels = torch.zeros(33)
    alone = batches.batch_order(labels, 16, False, torch.Generator().manual_seed(0))
    shared = batches.batch_order(labels, 16, False, torch.Generator().manual_seed(0), 2)
    assert [len(b) for b in alone] == [16, 16, 1]
    assert [len(b) for b in shared] == [16, 17]
    assert torch.equal(torch.cat(shared), torch.cat(alone))
    assert batches.steps_per_epoch(33, 16, 1) == 3 and batches.steps_per_epoch(33, 16, 2) == 2
    assert batches.steps_per_epoch(34, 16, 2) == 3 and batches.steps_per_epoch(8, 16, 4) == 1


def test_each_process_augments_its_rows_as_one_process_augments_the_batch(params: Params):
    x = torch.rand(5, 1, SIZE, SIZE)
    whole = augment_batch(x, params.train.augment, torch.Generator().manual_seed(4))
    for rank in (0, 1):
        rows = slice(rank, None, 2)
        share = augment_batch(
            x[rows], params.train.augment, torch.Generator().manual_seed(4), (5, rows)
        )
        torch.testing.assert_close(share, whole[rows])


def test_cpu_threads_are_shared_by_the_processes_and_queue_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        assert device.use_cpu_threads(3) == 3 == torch.get_num_threads()
        assert device.use_cpu_threads(0) == cores
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # torchrun --nproc-per-node
        assert device.use_cpu_threads(0) == 1
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        monkeypatch.setattr(device, "queue_workers", lambda: 2 * cores)
        assert device.use_cpu_threads(0) == 1
    finally:
        torch.set_num_threads(before)


def test_queue_workers_counts_the_live_dvc_queue_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    project = tmp_path / "project"
    records = project / ".dvc/tmp/exps/celery"
    records.mkdir(parents=True)
    copy = project / ".dvc/tmp/exps/tmpab12cd"  # where DVC runs a queued experiment
    copy.mkdir()
    workers = {
        1: {"pid": os.getpid(), "returncode": None},
        2: {"pid": os.getppid(), "returncode": None},
        3: {"pid": os.getpid(), "returncode": 0},  # exited; its record stays
        4: {"pid": 2**22 + 1, "returncode": None},  # killed: no such process
    }
    for k, record in workers.items():
        (records / f"dvc-exp-worker-{k}.json").write_text(json.dumps(record))
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.chdir(copy)
    assert stage.queue_workers() == 2
    monkeypatch.chdir(project)  # `dvc repro` or `dvc exp run` in the project itself
    assert stage.queue_workers() == 1


def test_a_split_over_the_memory_budget_is_streamed():
    cpu = torch.device("cpu")
    assert device.memory_budget(0.5, cpu) == 500_000_000
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert device.memory_budget(0, cpu) == physical // 2
