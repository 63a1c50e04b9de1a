import dataclasses
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from cxr.model import Classifier, ModelCard, create_model, save_model
from cxr.params import AugmentParams, Params, load_params
from cxr.training import DeviceData, Trainer, TrainState, augment, set_backbone_frozen
from tests.conftest import REPO

SIZE = 32


@pytest.fixture
def params() -> Params:
    base = load_params(REPO / "params.yaml")
    return dataclasses.replace(base, image_size=SIZE, batch_size=16, lr=2e-3, epochs=4)


def _squares(n: int, seed: int) -> DeviceData:
    """Dark images; positives carry a bright square somewhere: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images = rng.integers(20, 60, (n, SIZE, SIZE)).astype(np.uint8)
    labels = (np.arange(n) % 2).astype(np.int64)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(2, SIZE - 10, 2)
        images[i, y : y + 8, x : x + 8] = 220
    return DeviceData.from_arrays(images, labels, torch.device("cpu"))


def _trainer(params: Params, seed: int = 0) -> Trainer:
    torch.manual_seed(seed)
    model = create_model("resnet10t", "none")
    trainer = Trainer(model, params, torch.device("cpu"), mean=0.2, std=0.2, pos_weight=1.0)
    trainer.make_scheduler(steps_per_epoch=4)
    return trainer


def test_a_few_epochs_lower_the_loss(params: Params):
    trainer = _trainer(params)
    data = _squares(64, seed=0)
    losses = [trainer.train_epoch(data, epoch, frozen=False)[0] for epoch in range(1, 5)]
    assert losses[-1] < 0.7 * losses[0]


def test_training_is_deterministic_on_cpu(params: Params):
    states = []
    for _ in range(2):
        trainer = _trainer(params)
        trainer.train_epoch(_squares(32, seed=1), 1, frozen=False)
        states.append(trainer.model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_weight_averaging_validates_and_keeps_the_running_average(params: Params):
    decay = 0.8
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, ema_decay=decay))
    trainer = _trainer(params)
    data = _squares(16, seed=2)  # one batch: one optimizer step per epoch
    snapshots = []
    for epoch in (1, 2):
        trainer.train_epoch(data, epoch, frozen=False)
        snapshots.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    averaged = trainer.kept_model.state_dict()
    for key, value in averaged.items():
        if value.is_floating_point():
            expected = decay * snapshots[0][key] + (1 - decay) * snapshots[1][key]
            torch.testing.assert_close(value, expected, msg=key)
    assert not torch.equal(averaged["fc.weight"], snapshots[1]["fc.weight"])

    aucs = iter([0.6, 0.7, 0.8, 0.9])  # every epoch is the best so far: the last one is kept
    trainer.validate = lambda data: (0.5, next(aucs))
    state = trainer.fit(data, data, TrainState(), lambda record, state: None)
    assert state.best_epoch == 4
    kept, last = state.best_state, trainer.model.state_dict()
    for key, value in trainer.kept_model.state_dict().items():
        assert torch.equal(kept[key], value), key
    assert not torch.equal(kept["fc.weight"], last["fc.weight"])


def test_frozen_backbone_trains_only_the_head(params: Params):
    trainer = _trainer(params)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_epoch(_squares(32, seed=2), 1, frozen=True)
    after = trainer.model.state_dict()
    head = {f"fc.{name}" for name, _ in trainer.model.get_classifier().named_parameters()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == head  # BatchNorm statistics stay frozen too
    set_backbone_frozen(trainer.model, False)
    assert all(p.requires_grad for p in trainer.model.parameters())


def test_augmentation_keeps_shape_and_range_and_can_be_switched_off():
    x = torch.rand(8, 1, SIZE, SIZE)
    generator = torch.Generator().manual_seed(0)
    out = augment(x, AugmentParams(10.0, 0.1, 0.05, True, 0.1, 0.1), generator)
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)
    identity = augment(x, AugmentParams(0.0, 0.0, 0.0, False, 0.0, 0.0), generator)
    assert torch.allclose(identity, x, atol=1e-5)


def test_saved_model_reloads_and_predicts_identically(tmp_path: Path, params: Params):
    trainer = _trainer(params)
    trainer.train_epoch(_squares(32, seed=3), 1, frozen=False)
    card = ModelCard(arch="resnet10t", image_size=SIZE, resize="pad", mean=0.2, std=0.2)
    save_model(tmp_path / "model.pt", trainer.model, card)
    loaded = Classifier.load(tmp_path / "model.pt")
    images = _squares(8, seed=4).images.numpy()
    trainer.model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(trainer.model(loaded.to_tensor(images))).squeeze(1).numpy()
    np.testing.assert_array_equal(loaded.predict_proba(images), expected)
    assert loaded.card == card
    assert loaded.threshold == 0.5  # until the evaluate stage stores one beside it
    (tmp_path / "threshold.json").write_text('{"threshold": 0.3}')
    assert Classifier.load(tmp_path / "model.pt").threshold == 0.3


def test_flip_tta_averages_an_image_and_its_mirror(tmp_path: Path, params: Params):
    trainer = _trainer(params)
    trainer.train_epoch(_squares(32, seed=3), 1, frozen=False)
    card = ModelCard(arch="resnet10t", image_size=SIZE, resize="pad", mean=0.2, std=0.2)
    save_model(tmp_path / "model.pt", trainer.model, card)
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
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained: weights file .*nowhere\.pth"):
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


def test_fit_stops_early_and_keeps_the_best_epoch(params: Params):
    params = dataclasses.replace(
        params, epochs=6, train=dataclasses.replace(params.train, patience=1)
    )
    trainer = _trainer(params)
    trainer.make_scheduler(steps_per_epoch=4)
    aucs = iter([0.6, 0.9, 0.8, 0.95, 0.7, 0.7])
    trainer.validate = lambda data: (0.5, next(aucs))
    records = []
    state = trainer.fit(
        _squares(32, 5), _squares(16, 6), TrainState(), lambda r, s: records.append(r)
    )
    assert [r.epoch for r in records] == [1, 2, 3]
    assert (state.best_epoch, state.best_auc) == (2, 0.9)
    assert state.best_state is not None
